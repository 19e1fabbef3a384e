"""Benchmark 13: the driver's round trips per step and the staleness cycle's hops, this tree against a baseline commit.

    .venv/bin/python bench/driver_trips.py --baseline REV [--quick | --full] [--regime learner-bound|generation-bound|both]

rlfleet asynchronous (``max_staleness`` 1) in both regimes of ``bench/vs_trl.py`` (its worker, the same job), run from
this working tree ("after") and from a temporary ``git worktree`` of ``REV`` ("before"), alternating A B B A (and
again with ``--full``) so that both meet the same machine. Per run, over steps 3..N-1 as in vs_trl:

- ``step_s``: the mean wall between step ends; ``learner_s``, ``gen_s``, ``sync_s``: the learner's step, the
  generators' busy time, the weight load;
- ``hops_s = 2 x step_s - gen_s - sync_s - learner_s``: what the staleness cycle adds beyond its stages (vs_trl's
  docstring derives it);
- ``trips_per_step``: the driver's ``driver/round_trips`` (calls whose answer the loop waits for: to the replay
  actor, the learner, the GCS's node table) per step. A baseline without that counter shows none.

Both trees must be importable by the same virtual environment (same dependencies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, LoadMonitor, arg_parser, load_line, machine, mean, pick, print_table, save_json  # noqa: E402

REGIMES = {"learner-bound": ("small", "target_length", (6, 10, 10)),
           "generation-bound": ("tiny", "char_count", (12, 30, 30))}


def run(tree: Path, model: str, task: str, steps: int, workdir: Path) -> dict:
    """One ``rlfleet train`` through ``tree``'s vs_trl worker; the figures of its timed steps."""
    result = workdir / f"run-{time.monotonic_ns()}.json"
    command = [sys.executable, str(tree / "bench" / "vs_trl.py"), "--worker", "rlfleet-grpo", "--staleness", "1",
               "--model", model, "--steps", str(steps), "--result", str(result), "--task", task]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tree, env=env)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"{tree}: the run failed (exit {proc.returncode})\n{(proc.stdout + proc.stderr)[-3000:]}")
    data = json.loads(result.read_text())
    ends, timed = data["step_end"], slice(2, -1)
    row = {"steps": len(ends), "step_s": mean([b - a for a, b in zip(ends, ends[1:])][1:-1])}
    for key in ("learner_s", "gen_s", "sync_s"):
        row[key] = mean(data[key][timed])
    row["hops_s"] = 2 * row["step_s"] - row["gen_s"] - (row["sync_s"] or 0.0) - row["learner_s"]
    trips = [t for t in data.get("round_trips", [])[timed] if t is not None]
    row["trips_per_step"] = (trips[-1] - trips[0]) / (len(trips) - 1) if len(trips) > 1 else None
    return row


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare with")
    parser.add_argument("--regime", default="both", choices=["learner-bound", "generation-bound", "both"])
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-trips-"))
    before = workdir / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), commit], cwd=REPO, check=True,
                   capture_output=True)
    trees = {f"before ({commit})": before, "after (this tree)": REPO}
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    rows, tables = [], []
    try:
        with LoadMonitor() as load:
            for regime in regimes:
                model, task, steps_by_mode = REGIMES[regime]
                steps = pick(args.mode, *steps_by_mode)
                order = list(trees) + list(trees)[::-1]
                order = order + order if args.mode == "full" else order
                runs = []
                for name in order:
                    runs.append({"tree": name, **run(trees[name], model, task, steps, workdir)})
                    print(f"  {regime}, {name}: step {runs[-1]['step_s']:.3f} s, hops {runs[-1]['hops_s']:.3f} s, "
                          f"trips/step {runs[-1]['trips_per_step']}", flush=True)
                for name in trees:
                    mine = [r for r in runs if r["tree"] == name]
                    rows.append({"regime": regime, "tree": name, "runs": len(mine),
                                 **{k: mean([r[k] for r in mine]) for k in mine[0] if k != "tree"}})
                rows[-1]["steps"] = steps
                tables.append(print_table([r for r in rows if r["regime"] == regime],
                                          ["tree", "runs", "steps", "step_s", "learner_s", "gen_s", "sync_s",
                                           "hops_s", "trips_per_step"],
                                          title=f"rlfleet async (max_staleness 1), {regime} (builtin:{model} on "
                                                f"builtin:{task}): the driver's round trips and the cycle's hops"))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    summary = load.summary()
    print(load_line(summary))
    save_json("driver_trips", {"machine": machine(), "load": summary, "baseline": commit, "rows": rows,
                               "tables": tables, "command": " ".join(sys.argv)}, args.out)


if __name__ == "__main__":
    main()
