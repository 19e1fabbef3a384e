"""Benchmark 11: the generation engine's CPU settings, measured: torch threads, OpenMP waiting, neighbours, batch
size, eager or compiled, and what they do to a whole job.

    .venv/bin/python bench/engine_settings.py [--quick | --full] [--no-job]

Issue 19 asks that the engines be configured for the cores they own, by measurement. Two parts, each setting in a
fresh process (OpenMP reads its settings once per process), interleaved in rounds (A B C ..., then reversed with
--full) so a ratio holds on this shared machine:

1. **The engine alone** (``Engine.sample``, the generation-bound request of ``bench/vs_trl.py``: ``builtin:tiny``,
   4 prompts x 8 completions x 24 tokens; median of the timed calls after 3 warm-up calls), with:
   - 1 or 2 torch threads (Ray gives an actor of 1 CPU ``OMP_NUM_THREADS=1``);
   - the other core idle, or busy with a neighbour: one process running a one-thread matmul loop, as the learner
     does beside the generator in an asynchronous job;
   - OpenMP's default (active, spinning) waiting or ``OMP_WAIT_POLICY=PASSIVE``;
   - vLLM's eager mode (rlfleet's default, ``generation.enforce_eager: true``) or compiled (``false``: torch.compile
     of the model on CPU), with its start-up time;
   - in the baseline process, requests of 2, 4, 8 and 16 prompts (16 to 128 sequences): per-group cost by batch size.
   vLLM's own CPU thread binding (``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_NUM_OF_RESERVED_CPU``) is applied only by
   its multiprocess executor (``vllm/utils/ompmultiprocessing.py``), which rlfleet's in-process engine does not use
   (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, platform notes: start 5 s instead of 38 s): there, Ray's
   ``OMP_NUM_THREADS`` is what sets the engine's threads, and this benchmark measures that.
2. **The job** (unless ``--no-job``): the generation-bound GRPO job of ``bench/vs_trl.py`` (asynchronous, 40 steps)
   with every actor on 1 torch thread (Ray's default), the learner on 2 (``cluster.learner_threads: 2``), every
   actor on 2, and every actor on 2 with passive waiting (``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` in the job's
   environment, which its actors inherit): wall per step (steps 3..N-1) and where it goes. The learner-bound job
   with the learner on 2 threads, and the generation-bound one with a compiled engine, are rows of
   ``bench/vs_trl.py``, beside TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (QUIET, REPO, LoadMonitor, arg_parser, load_line, machine, mean, pick, print_table,  # noqa: E402
                          read_metrics, save_json, setup_env)

REQUEST = dict(prompts=4, num_generations=8, completion_length=24, prompt_tokens=40)
NEIGHBOUR = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\n"
             "while True:\n    a = (a @ a).tanh()\n")
# name -> (torch threads, eager, neighbour busy, extra environment)
ENGINE_SETTINGS = {
    "1 thread": (1, True, False, {}),
    "2 threads": (2, True, False, {}),
    "1 thread, neighbour busy": (1, True, True, {}),
    "2 threads, neighbour busy": (2, True, True, {}),
    "2 threads passive, neighbour busy": (2, True, True, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread, compiled": (1, False, False, {}),
}
JOB_SETTINGS = {  # name -> (environment of the job, which its actors inherit; config overrides)
    "1 thread per actor": ({"OMP_NUM_THREADS": "1"}, []),
    "learner on 2 threads": ({"OMP_NUM_THREADS": "1"}, ["cluster.learner_threads=2"]),
    "2 threads per actor": ({"OMP_NUM_THREADS": "2"}, []),
    "2 threads per actor, passive": ({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}, []),
}


def worker_engine(threads: int, eager: bool, busy: bool, calls: int, batches: bool, result: Path) -> None:
    """Time ``Engine.sample`` in this process (one setting), write the figures to ``result``."""
    import torch

    torch.set_num_threads(threads)
    from rlfleet.config import load_config
    from rlfleet.generation.engine import Engine

    cfg = load_config(REPO / "deploy" / "quickstart.yaml",
                      [f"generation.max_completion_length={REQUEST['completion_length']}",
                       f"generation.enforce_eager={str(eager).lower()}"])
    t0 = time.perf_counter()
    engine = Engine(cfg.model, cfg.generation, seed=0)
    rng = random.Random(0)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(32, 127) for _ in range(REQUEST["prompt_tokens"])] for _ in range(n)]

    for _ in range(3):
        engine.sample(prompts(REQUEST["prompts"]), REQUEST["num_generations"])
    start_s = time.perf_counter() - t0
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if busy else None
    try:
        def timed(n_prompts: int) -> tuple[float, int]:
            batch = prompts(n_prompts)
            seconds, tokens = [], 0
            for _ in range(calls):
                t = time.perf_counter()
                out = engine.sample(batch, REQUEST["num_generations"])
                seconds.append(time.perf_counter() - t)
                tokens = sum(len(c.token_ids) for group in out for c in group)
            return statistics.median(seconds), tokens

        sample_s, tokens = timed(REQUEST["prompts"])
        by_batch = {str(n): timed(n)[0] for n in (2, 4, 8, 16)} if batches else {}
    finally:
        if neighbour is not None:
            neighbour.kill()
    result.write_text(json.dumps({"sample_s": sample_s, "tokens": tokens, "start_s": start_s,
                                  "threads_seen": torch.get_num_threads(), "by_batch": by_batch}))


def run_engine_setting(name: str, calls: int, batches: bool, workdir: Path) -> dict:
    threads, eager, busy, env = ENGINE_SETTINGS[name]
    result = workdir / f"engine-{time.monotonic_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "engine", "--threads", str(threads),
               "--calls", str(calls), "--result", str(result)] + (["--compiled"] if not eager else []) + \
              (["--busy"] if busy else []) + (["--batches"] if batches else [])
    proc = subprocess.run(command, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": str(threads)} | env)
    if proc.returncode != 0 or not result.exists():
        print(f"  {name}: FAILED (exit {proc.returncode})\n{(proc.stdout + proc.stderr)[-2000:]}", flush=True)
        return {"setting": name, "failed": True}
    data = json.loads(result.read_text())
    print(f"  {name}: {data['sample_s']:.3f} s per request (start {data['start_s']:.1f} s)", flush=True)
    return {"setting": name, **data}


def run_job(name: str, steps: int, workdir: Path) -> dict:
    """The generation-bound job of bench/vs_trl.py with ``JOB_SETTINGS[name]`` in its environment."""
    out = workdir / f"job-{time.monotonic_ns()}"
    command = [sys.executable, "-c", "import sys; from rlfleet.cli import main; sys.exit(main(sys.argv[1:]))",
               "train", str(REPO / "deploy" / "quickstart.yaml"), f"output_dir={out}", f"learner.max_steps={steps}",
               "data.dataset=builtin:char_count", f"generation.max_completion_length={REQUEST['completion_length']}",
               *QUIET, *JOB_SETTINGS[name][1]]
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ | JOB_SETTINGS[name][0])
    if proc.returncode != 0:
        print(f"  {name}: FAILED (exit {proc.returncode})\n{(proc.stdout + proc.stderr)[-2000:]}", flush=True)
        return {"setting": name, "failed": True}
    steps_ = [r for r in read_metrics(out) if "loss" in r][2:-1]
    row = {"setting": name, "step_s": mean(r["time/step_s"] for r in steps_),
           "gen_s": mean(r["time/gen_s"] for r in steps_), "learner_s": mean(r["time/learner_s"] for r in steps_),
           "sync_s": mean(r.get("sync/seconds") for r in steps_),
           "gen_idle": mean(r["idle/generator_frac"] for r in steps_)}
    print(f"  {name}: {row['step_s']:.3f} s per step", flush=True)
    return row


def pooled(rows: list[dict], names: list[str], baseline: str) -> list[dict]:
    out = []
    for name in names:
        runs = [r for r in rows if r["setting"] == name and not r.get("failed")]
        if not runs:
            out.append({"setting": name, "failed": True})
            continue
        keys = [k for k, v in runs[0].items() if isinstance(v, float)]
        out.append({**runs[0], **{k: mean(r[k] for r in runs) for k in keys}, "runs": len(runs)})
    base = next((r for r in out if r["setting"] == baseline and not r.get("failed")), None)
    key = "sample_s" if "sample_s" in (base or {}) else "step_s"
    for r in out:
        if base is not None and not r.get("failed"):
            r["vs_1_thread"] = r[key] / base[key]
    return out


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--no-job", action="store_true", help="the engine alone only")
    parser.add_argument("--worker", choices=["engine"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=15, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_env()
    if args.worker:
        worker_engine(args.threads, not args.compiled, args.busy, args.calls, args.batches, args.result)
        return

    rounds = pick(args.mode, 1, 2, 3)
    calls = pick(args.mode, 8, 15, 20)
    steps = pick(args.mode, 20, 40, 60)
    names, jobs = list(ENGINE_SETTINGS), ([] if args.no_job else list(JOB_SETTINGS))
    print(f"engine settings: {rounds} round(s) of {names}, {calls} timed calls each; jobs {jobs}, {steps} steps",
          flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-engine-"))
    engine_rows, job_rows = [], []
    with LoadMonitor() as load:
        for i in range(rounds):
            order = names if i % 2 == 0 else names[::-1]
            engine_rows += [run_engine_setting(n, calls, batches=(n == "1 thread"), workdir=workdir) for n in order]
        for i in range(rounds):
            order = jobs if i % 2 == 0 else jobs[::-1]
            job_rows += [run_job(n, steps, workdir) for n in order]
    engine = pooled(engine_rows, names, "1 thread")
    tables = [print_table(engine, ["setting", "runs", "sample_s", "vs_1_thread", "start_s", "tokens"],
                          title="The engine alone: seconds per request of 4 prompts x 8 x 24 tokens (median); "
                                "vs_1_thread = / the 1-thread, idle-neighbour setting")]
    base = [r for r in engine_rows if r["setting"] == "1 thread" and r.get("by_batch")]
    batch_rows = []
    for n in (2, 4, 8, 16):
        seconds = mean(r["by_batch"][str(n)] for r in base)
        batch_rows.append({"prompts": n, "sequences": n * REQUEST["num_generations"], "request_s": seconds,
                           "ms_per_group": 1000 * seconds / n})
    tables.append(print_table(batch_rows, ["prompts", "sequences", "request_s", "ms_per_group"],
                              title="Batch size, 1 thread: a request's seconds and its cost per group"))
    if job_rows:
        jobs_pooled = pooled(job_rows, jobs, "1 thread per actor")
        tables.append(print_table(jobs_pooled, ["setting", "runs", "step_s", "vs_1_thread", "gen_s", "learner_s",
                                                "sync_s", "gen_idle"],
                                  title="The generation-bound job (asynchronous): wall per step, steps 3..N-1"))
    else:
        jobs_pooled = []
    summary = load.summary()
    print(load_line(summary))
    save_json("engine_settings", {"benchmark": "engine_settings", "mode": args.mode, "request": REQUEST,
                                  "engine": engine, "batch": batch_rows, "job": jobs_pooled,
                                  "runs": {"engine": engine_rows, "job": job_rows}, "tables": tables,
                                  "load": summary, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
