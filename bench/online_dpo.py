"""Online DPO vs GRPO: reward per wall second on the same task, the same fleet, the same steps.

    .venv/bin/python bench/online_dpo.py [--quick | --full]

Both are real ``rlfleet train`` jobs (vLLM generation actor, replay actor, learner actor on one local Ray cluster) on
``builtin:target_length`` with the tiny model, 4 prompts x 8 completions per step, async with staleness 1:
``deploy/quickstart.yaml`` (GRPO, dapo normalisation) and ``deploy/online_dpo.yaml`` (DPO on each group's best-vs-
worst pair, BEMA reference every 10 steps), without evaluation. Runs alternate (A B, and A B B A with --full).

Figures per configuration, from ``metrics.jsonl`` (the batch reward of each step): the mean reward over the first
and the last 20 steps, the gain between them, the training seconds (sum of ``time/step_s``: the loop, start-up left
out), the gain per training second, the step time, and the seconds until the trailing 15-step mean reward first
reaches 0.6 (None if it never does).
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

JOBS = {"grpo": ("quickstart", []),
        "online_dpo": ("online_dpo", ["logging.eval_steps=null", "data.eval_split=null"])}
THRESHOLD, TRAILING = 0.6, 15


def seconds_to(records: list[dict], threshold: float, window: int) -> float | None:
    """Training seconds until the mean reward of the last ``window`` steps first reaches ``threshold``."""
    elapsed = 0.0
    for i, r in enumerate(records):
        elapsed += r["time/step_s"]
        if i + 1 >= window and mean(x["reward/mean"] for x in records[i + 1 - window:i + 1]) >= threshold:
            return elapsed
    return None


def figures(name: str, records: list[dict], total_s: float) -> dict:
    first, last = mean(r["reward/mean"] for r in records[:20]), mean(r["reward/mean"] for r in records[-20:])
    train_s = sum(r["time/step_s"] for r in records)
    return {"job": name, "steps": len(records), "reward_first20": first, "reward_last20": last, "gain": last - first,
            "train_s": train_s, "gain_per_s": (last - first) / train_s, "step_s": train_s / len(records),
            f"s_to_{THRESHOLD}": seconds_to(records, THRESHOLD, TRAILING), "total_s": total_s}


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    args = parser.parse_args()
    setup_env()
    order = pick(args.mode, ["grpo", "online_dpo"], ["grpo", "online_dpo"],
                 ["grpo", "online_dpo", "online_dpo", "grpo"])
    steps = pick(args.mode, 40, 150, 150)
    print(f"online DPO vs GRPO on builtin:target_length, tiny model: runs {order}, {steps} steps each", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-online-dpo-"))
    init_ray(num_cpus=4)
    rows, runs = [], []
    with LoadMonitor() as load:
        for name in order:
            job, overrides = JOBS[name]
            run = train_quickstart(workdir / f"{name}-{time.monotonic_ns()}", [f"learner.max_steps={steps}",
                                                                                *overrides], job=job)
            rows.append(figures(name, run.records, run.total_s))
            runs.append({"job": name, "rewards": [r["reward/mean"] for r in run.records],
                         "step_s": [r["time/step_s"] for r in run.records], "load": run.load})
            r = rows[-1]
            print(f"  {name}: reward {r['reward_first20']:.3f} -> {r['reward_last20']:.3f} in {r['train_s']:.1f} s "
                  f"of training ({r['step_s']:.3f} s/step), run {r['total_s']:.0f} s", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    table = print_table(rows, ["job", "steps", "reward_first20", "reward_last20", "gain", "train_s", "gain_per_s",
                               "step_s", f"s_to_{THRESHOLD}", "total_s"],
                        title="online DPO vs GRPO: batch reward (first / last 20 steps) and its gain per training "
                              f"second; s_to_{THRESHOLD}: training seconds until the trailing {TRAILING}-step mean "
                              f"reward reaches {THRESHOLD}")
    summary = load.summary()
    print(load_line(summary))
    save_json("online_dpo", {"benchmark": "online_dpo", "mode": args.mode, "order": order, "steps": steps,
                             "machine": machine(), "load": summary, "rows": rows, "runs": runs, "table": table},
              args.out)


if __name__ == "__main__":
    main()
