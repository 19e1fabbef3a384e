"""Benchmark 15: multi-turn episodes on the batched engine (turn by turn per request) against the continuous engine
(every episode on its own), with an environment that answers at once and with one that takes a while.

    .venv/bin/python bench/multi_turn.py [--quick | --full] [--steps N] [--latency-ms M]

**The job** is ``deploy/multi_turn.yaml`` (three-turn ``char_count`` episodes with a scripted user, 4 prompts x 8
episodes a step, ``max_staleness`` 1), run by ``rlfleet train`` in a process of its own per system, the systems
interleaved (A B C D, and D C B A with ``--full``).

**The environments.** ``scripted_user`` answers in microseconds. ``SlowUser`` (below) answers the same words after
a delay drawn per call from an exponential distribution of mean ``--latency-ms`` (default 100 ms), capped at 10x the
mean: a tool, a sandbox or a judge whose latency varies from call to call. On the batched engine a turn waits for
the slowest of its request's 32 answers; on the continuous engine an episode waits only for its own.

Per system: ``step_s`` (mean wall between step ends, ``time/step_s`` of steps 3..N-1), ``episodes_per_s`` (32 / step_s), the engine's
busy time per step (``gen_s``; one engine) and its share of the step, the learner's time per step, the environment's
seconds per step (summed over the episodes' calls: they overlap), token staleness, the most versions one episode
spanned, and the reward over the first and last 10 steps. Ratios: ``vs_batched`` (episodes/s against the batched
engine with the same environment).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (QUIET, REPO, LoadMonitor, arg_parser, load_line, mean, pick, pool_runs,  # noqa: E402
                          print_table, read_metrics, save_json, setup_env)
from rlfleet.environments import ScriptedUser  # noqa: E402

EPISODES = 32  # 4 prompts x 8 episodes per step (deploy/multi_turn.yaml)


class SlowUser(ScriptedUser):
    """``scripted_user``'s answers after an exponential delay of mean ``latency_ms`` (capped at 10x), per call."""

    def __init__(self, replies: list[str], latency_ms: float, seed: int = 0):
        super().__init__(replies)
        self.mean_s = latency_ms / 1000
        self._random, self._lock = random.Random(seed), threading.Lock()

    def env_response(self, messages: list[dict], state: dict) -> list[dict]:
        with self._lock:
            delay = min(self._random.expovariate(1 / self.mean_s), 10 * self.mean_s)
        time.sleep(delay)  # the tool's latency (a benchmark's stand-in for real work elsewhere)
        return super().env_response(messages, state)


def systems(latency_ms: float) -> dict[str, list[str]]:
    slow = ["algorithm.environment=bench.multi_turn:SlowUser", f"algorithm.environment_kwargs.latency_ms={latency_ms}"]
    return {
        "batched, instant user": ["generation.engine=batched"],
        "continuous, instant user": ["generation.engine=continuous"],
        f"batched, user {latency_ms:g} ms": ["generation.engine=batched", *slow],
        f"continuous, user {latency_ms:g} ms": ["generation.engine=continuous", *slow],
    }


def launch(name: str, overrides: list[str], steps: int, workdir: Path) -> dict:
    out = workdir / f"run-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "rlfleet.cli", "train", str(REPO / "deploy" / "multi_turn.yaml"),
               f"output_dir={out}", f"learner.max_steps={steps}", *QUIET, *overrides]
    t0 = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {name}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
        return {"system": name, "failed": True, "error_tail": tail}
    records = read_metrics(out)
    shutil.rmtree(out, ignore_errors=True)
    timed = records[2:-1]
    step_s = mean(r["time/step_s"] for r in timed)  # each: the wall since the step before ended
    row = {"system": name, "steps": len(records), "step_s": step_s, "episodes_per_s": EPISODES / step_s,
           "total_s": time.time() - t0, "reward_first10": mean(r["reward/mean"] for r in records[:10]),
           "reward_last10": mean(r["reward/mean"] for r in records[-10:])}
    for key, metric in (("gen_s", "time/gen_s"), ("learner_s", "time/learner_s"), ("env_s", "env/seconds"),
                        ("token_staleness", "staleness/token_mean"), ("turns", "env/turns_per_episode")):
        values = [r[metric] for r in timed if r.get(metric) is not None]
        if values:
            row[key] = mean(values)
    spans = [r["staleness/version_span_max"] for r in records if r.get("staleness/version_span_max") is not None]
    row["version_span"] = max(spans, default=0)
    if row.get("gen_s") is not None:
        row["engine_busy"] = row["gen_s"] / step_s
    print(f"  {name}: step {step_s:.3f} s, {row['episodes_per_s']:.1f} episodes/s", flush=True)
    return row


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args()
    setup_env()
    steps = args.steps or pick(args.mode, 10, 30, 30)
    table_systems = systems(args.latency_ms)
    names = list(table_systems)
    order = names + (names[::-1] if args.mode == "full" else [])
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-multiturn-"))
    with LoadMonitor() as load:
        results = [launch(name, table_systems[name], steps, workdir) for name in order]
    shutil.rmtree(workdir, ignore_errors=True)
    rows = pool_runs(results, names)
    for r in rows:
        batched = next((b for b in rows if b["system"] == r["system"].replace("continuous", "batched")), None)
        if batched is not None and not r.get("failed") and not batched.get("failed"):
            r["vs_batched"] = r["episodes_per_s"] / batched["episodes_per_s"]
    table = print_table(rows, ["system", "runs", "steps", "step_s", "episodes_per_s", "vs_batched", "gen_s",
                               "engine_busy", "learner_s", "env_s", "token_staleness", "version_span", "turns",
                               "reward_first10", "reward_last10", "total_s"],
                        title=f"Multi-turn episodes (deploy/multi_turn.yaml: 3 turns, {EPISODES} episodes a step, "
                              f"max_staleness 1), cores {os.cpu_count()}")
    summary = load.summary()
    print(load_line(summary))
    save_json("multi_turn", {"rows": rows, "table": table, "load": summary, "steps": steps, "mode": args.mode,
                             "latency_ms": args.latency_ms}, args.out)


if __name__ == "__main__":
    main()
