"""Benchmark 1: asynchronous vs synchronous training, the same job with ``replay.max_staleness`` 0, 1 and 2.

    .venv/bin/python bench/async_vs_sync.py [--quick | --full] [--model small|tiny]

Each configuration is a real ``rlfleet train`` (vLLM generation actor, replay actor, learner actor on one local Ray
cluster), the same job (deploy/quickstart.yaml: GRPO on ``builtin:target_length``, 4 prompts x 8 completions per
step) on a model large enough that compute dominates (``builtin:small``, ~18M parameters). Runs alternate
(A B C, and A B C C B A with --full); the first ``skip`` steps of each run (engine warm-up) are left out.

Figures per run, from ``metrics.jsonl``: trained groups per second = groups_per_step / mean ``time/step_s``,
the learner's compute ``t_learn`` (``time/learner_s``) and the generator's busy time per step ``t_gen``
(``time/gen_s``). With generation and learning on separate actors, an asynchronous step should take
``max(t_gen, t_learn)`` instead of ``t_gen + t_learn``, so the ideal speedup over the synchronous run is
``(t_gen + t_learn) / max(t_gen, t_learn)`` with the synchronous run's stage times; ``of_ideal`` is the measured
speedup divided by it. ``learner_slowdown`` (t_learn async / t_learn sync) shows what overlapping costs the learner
when the two stages share too few cores, and ``overlap`` = max(t_gen, t_learn) / step (t_gen + t_learn for the
synchronous run) how much of a step the stages themselves explain, with their times as measured in that run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (LoadMonitor, arg_parser, init_ray, load_line, machine, mean, pick, print_table,  # noqa: E402
                          save_json, setup_env, train_quickstart)


def run_one(staleness: int, model: str, steps: int, completion_length: int, workdir: Path) -> dict:
    run = train_quickstart(workdir / f"staleness{staleness}-{time.monotonic_ns()}", [
        f"model.name_or_path=builtin:{model}", f"replay.max_staleness={staleness}", f"learner.max_steps={steps}",
        f"generation.max_completion_length={completion_length}"])
    return {"staleness": staleness, "total_s": run.total_s, "records": run.records,
            "groups_per_step": run.cfg.learner.groups_per_step, "load": run.load}


def summarise(runs: list[dict], skip: int) -> dict:
    """Figures of one configuration over its runs, pooling their steady steps (each step weighted equally)."""
    steady = [r for run in runs for r in run["records"][skip:]]
    step_s = mean(r["time/step_s"] for r in steady)
    return {
        "staleness": runs[0]["staleness"],
        "runs": len(runs),
        "steps": len(steady),
        "step_s": step_s,
        "groups_per_s": runs[0]["groups_per_step"] / step_s,
        "t_learn_s": mean(r["time/learner_s"] for r in steady),
        "t_gen_s": mean(r["time/gen_s"] for r in steady),
        "sync_s": mean(r["sync/seconds"] for r in steady),
        "learner_idle": mean(r["idle/learner_frac"] for r in steady),
        "staleness_mean": mean(r["staleness/mean"] for r in steady),
        "reward_last": mean(run["records"][-1]["reward/mean"] for run in runs),
        "total_s": mean(run["total_s"] for run in runs),
        "busy_cores": mean(run["load"]["busy_cores"] for run in runs),
        "other_busy_cores": mean(run["load"]["other_busy_cores"] for run in runs),
    }


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", choices=["small", "tiny"])
    args = parser.parse_args()
    setup_env()
    order = pick(args.mode, [0, 1], [0, 1, 2], [0, 1, 2, 2, 1, 0])
    steps = pick(args.mode, 6, 10, 16)
    skip = 2
    completion_length = 24

    print(f"async vs sync: model builtin:{args.model}, runs {order} (max_staleness), {steps} steps each, first "
          f"{skip} left out", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-async-"))
    init_ray(num_cpus=4)
    runs = []
    with LoadMonitor() as load:
        for s in order:
            runs.append(run_one(s, args.model, steps, completion_length, workdir))
            r = summarise(runs[-1:], skip)
            print(f"  staleness {s}: {r['groups_per_s']:.3f} groups/s, step {r['step_s']:.3f} s "
                  f"(t_learn {r['t_learn_s']:.3f}, t_gen {r['t_gen_s']:.3f}), run {r['total_s']:.0f} s", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)

    rows = [summarise([run for run in runs if run["staleness"] == s], skip) for s in sorted(set(order))]
    sync = rows[0]
    ideal = (sync["t_gen_s"] + sync["t_learn_s"]) / max(sync["t_gen_s"], sync["t_learn_s"])
    for row in rows:
        row["speedup"] = row["groups_per_s"] / sync["groups_per_s"]
        row["ideal"] = ideal if row["staleness"] > 0 else 1.0
        row["of_ideal"] = row["speedup"] / row["ideal"]
        row["learner_slowdown"] = row["t_learn_s"] / sync["t_learn_s"]
        stages_s = (row["t_gen_s"] + row["t_learn_s"] if row["staleness"] == 0
                    else max(row["t_gen_s"], row["t_learn_s"]))  # what the step would take with no overhead
        row["overhead_s"] = row["step_s"] - stages_s
        row["overlap"] = stages_s / row["step_s"]
    table = print_table(rows, ["staleness", "runs", "steps", "groups_per_s", "step_s", "t_learn_s", "t_gen_s",
                               "sync_s", "overhead_s", "overlap", "speedup", "ideal", "of_ideal", "learner_slowdown",
                               "learner_idle", "staleness_mean", "busy_cores",
                               "other_busy_cores"],
                        title=f"async vs sync, builtin:{args.model}: speedup = groups/s over staleness 0; ideal = "
                              "(t_gen + t_learn) / max(t_gen, t_learn) from the synchronous run")
    summary = load.summary()
    print(load_line(summary))
    save_json(f"async_vs_sync-{args.model}", {
        "benchmark": "async_vs_sync", "mode": args.mode, "model": f"builtin:{args.model}", "order": order,
        "steps": steps, "skip": skip, "completion_length": completion_length, "machine": machine(), "load": summary,
        "rows": rows, "runs": runs, "table": table}, args.out)


if __name__ == "__main__":
    main()
