"""Benchmark 5: how rlfleet's orchestration scales with the number of generation actors.

    .venv/bin/python bench/orchestration_scale.py [--quick | --full] [--latency 0.25]
                                                  [--staleness 1 --consume-order both]

Real ``rlfleet train`` runs (driver, admission control, replay actor, learner actor on the tiny model, weight
publication every step), except that each generation actor's vLLM engine is a fixed-latency stand-in
(``bench/standin.py``: ``latency_s`` of sleep per request, then random completions; tokenization, rewards,
advantages, group packing and the replay hop are rlfleet's own). One request = ``prompts_per_request`` prompts x 8
completions, so one generator alone can deliver at most ``prompts_per_request / latency_s`` groups/s and N of them
``ideal = N * prompts_per_request / latency_s``: the linear line. The learner caps it at ``learner_cap =
groups_per_step / t_learn`` (its compute per step, measured in the same run). ``of_bound = trained groups/s /
min(ideal, learner_cap)``.

The staleness window is set wide enough (``(max_staleness + 1) * groups_per_step`` groups >= every generator's
request in flight) that admission control never idles a generator below saturation. Runs go 1, 2, 4, ... generators
(32 with --full: starting 32 actor processes alone takes minutes on 2 cores); each runs long enough for ~8 s of
steady steps; its first steps are left out. The driver's per-step phases, as the driver times them itself
(``admit``: replay stats + launching requests and weight updates; ``collect``: finished requests;
``finish_step``: replay stats + the metrics line; the weights are published at the end of the learner's step), to account for ``learner_wait_ms``, the
learner's idle time per step.

``--staleness 1 --consume-order both`` runs each fleet size at ``max_staleness: 1`` in both of
``replay.consume_order``'s orders, side by side (JSON ``orchestration_scale-s1.json``). There the window is 2 x 8 = 16
groups, still one per slot of 8 generators (2 requests each), so what separates the orders is admission alone: in
arrival order a request waits while one sampled with older weights is in flight on another generator; in request
order it does not.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (LoadMonitor, arg_parser, init_ray, load_line, machine, mean, pick,  # noqa: E402
                          print_table, save_json, setup_env, train_quickstart)

PROMPTS_PER_REQUEST = 1
NUM_GENERATIONS = 8
GROUPS_PER_STEP = 8
MAX_STALENESS = 4  # window (4 + 1) * 8 = 40 groups >= 32 generators x 1 prompt in flight
SKIP = 3
STEADY_S = 8.0
LEARNER_CAP_GUESS = 40.0  # groups/s, only to size the runs


DRIVER_PHASES = ("admit", "collect", "finish_step")  # the driver's timed phases: time/driver/<phase>_s


def run_one(n: int, latency_s: float, workdir: Path, staleness: int = MAX_STALENESS,
            consume_order: str = "arrival") -> dict:
    from bench.standin import fixed_latency

    ideal = n * PROMPTS_PER_REQUEST / latency_s
    steps = SKIP + min(40, max(4, math.ceil(STEADY_S * min(ideal, LEARNER_CAP_GUESS) / GROUPS_PER_STEP)))
    run = train_quickstart(workdir / f"gen{n}-{time.monotonic_ns()}", [
        f"cluster.num_generators={n}", "cluster.max_restarts=0",
        f"generation.generation_batch_size={PROMPTS_PER_REQUEST * NUM_GENERATIONS}",
        f"generation.num_generations={NUM_GENERATIONS}", f"learner.groups_per_step={GROUPS_PER_STEP}",
        f"learner.micro_batch_size={GROUPS_PER_STEP * NUM_GENERATIONS}", f"replay.max_staleness={staleness}",
        f"replay.consume_order={consume_order}", f"learner.max_steps={steps}"], engine_factory=fixed_latency(latency_s))
    records, total_s = run.records, run.total_s
    steady = records[SKIP:]
    wall = sum(r["time/step_s"] for r in steady)
    t_learn = mean(r["time/learner_s"] for r in steady)
    row = {
        "generators": n, "consume_order": consume_order, "steps": len(steady), "ideal": ideal,
        "groups_per_s": GROUPS_PER_STEP * len(steady) / wall,
        "generated_per_s": sum(r["gen/groups"] for r in steady) / wall,
        "learner_cap": GROUPS_PER_STEP / t_learn, "t_learn_s": t_learn, "step_s": wall / len(steady),
        "learner_idle": mean(r["idle/learner_frac"] for r in steady),
        "generator_idle": mean(r["idle/generator_frac"] for r in steady),
        "staleness_max": max(r["staleness/max"] for r in steady),
        "learner_wait_ms": 1e3 * (wall / len(steady) - t_learn),  # the learner's idle time per step
        **{f"{name}_ms": 1e3 * (steady[-1].get(f"time/driver/{name}_s", 0.0)
                                 - records[SKIP - 1].get(f"time/driver/{name}_s", 0.0)) / len(steady)
           for name in DRIVER_PHASES},
        "total_s": total_s, "busy_cores": run.load["busy_cores"], "other_busy_cores": run.load["other_busy_cores"],
    }
    row["bound"] = min(ideal, row["learner_cap"])
    row["of_bound"] = row["groups_per_s"] / row["bound"]
    row["of_ideal"] = row["groups_per_s"] / ideal
    print(f"  {n} generators ({consume_order} order): {row['groups_per_s']:.1f} groups/s trained (ideal {ideal:.1f}, "
          f"learner cap "
          f"{row['learner_cap']:.1f}), {row['busy_cores']:.2f} cores busy, run {total_s:.0f} s", flush=True)
    return row


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.25, help="stand-in engine seconds per request")
    parser.add_argument("--staleness", type=int, default=MAX_STALENESS, help="replay.max_staleness")
    parser.add_argument("--consume-order", default="arrival", choices=["arrival", "request", "both"],
                        help="replay.consume_order ('both': each fleet size in both orders, alternating)")
    args = parser.parse_args()
    setup_env()
    counts = pick(args.mode, [1, 4, 8], [1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32])
    if args.staleness < MAX_STALENESS:  # the window must still hold every generator's requests
        counts = [n for n in counts if 2 * n * PROMPTS_PER_REQUEST <= (args.staleness + 1) * GROUPS_PER_STEP]
    orders = ["arrival", "request"] if args.consume_order == "both" else [args.consume_order]
    order = counts
    print(f"orchestration scale: stand-in engine {args.latency} s per request of {PROMPTS_PER_REQUEST} prompt(s) x "
          f"{NUM_GENERATIONS}; generators {order}; {GROUPS_PER_STEP} groups per learner step (tiny model)",
          flush=True)
    init_ray(num_cpus=max(counts) + 4)  # more CPUs advertised than cores: the stand-ins mostly sleep
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-scale-"))
    runs = []
    with LoadMonitor() as load:
        for i, n in enumerate(order):
            for consume_order in orders if i % 2 == 0 else orders[::-1]:
                runs.append(run_one(n, args.latency, workdir, args.staleness, consume_order))
    shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for n in counts:
        for consume_order in orders:
            mine = [r for r in runs if r["generators"] == n and r["consume_order"] == consume_order]
            rows.append({k: mean(r[k] for r in mine) if isinstance(v, float) else v for k, v in mine[0].items()}
                        | {"runs": len(mine)})
    table = print_table(rows, ["generators", "consume_order", "runs", "steps", "ideal", "learner_cap", "bound",
                               "groups_per_s",
                               "of_bound", "of_ideal", "generated_per_s", "step_s", "t_learn_s", "learner_idle",
                               "generator_idle", "learner_wait_ms", "admit_ms", "collect_ms", "finish_step_ms",
                               "busy_cores", "other_busy_cores"],
                        title=f"orchestration scale (stand-in engine {args.latency} s/request, max_staleness "
                              f"{args.staleness}): trained groups/s vs "
                              "ideal = N x prompts/request / latency, learner_cap = groups_per_step / t_learn, "
                              "bound = min(ideal, learner_cap)")
    summary = load.summary()
    print(load_line(summary))
    name = "orchestration_scale" + ("" if args.staleness == MAX_STALENESS else f"-s{args.staleness}")
    save_json(name, {
        "benchmark": "orchestration_scale", "mode": args.mode, "latency_s": args.latency,
        "prompts_per_request": PROMPTS_PER_REQUEST, "num_generations": NUM_GENERATIONS,
        "groups_per_step": GROUPS_PER_STEP, "max_staleness": args.staleness, "consume_orders": orders,
        "order": order, "machine": machine(),
        "load": summary, "rows": rows, "runs": runs, "table": table}, args.out)


if __name__ == "__main__":
    main()
