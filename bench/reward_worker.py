"""What running reward functions in a worker process costs: one quickstart request's reward call (4 prompts x 8
completions of 24 tokens, builtin:target_length's reward) inline and through rlfleet's RewardWorker, side by side;
and how long a worker takes to start again after a crash.

    .venv/bin/python bench/reward_worker.py [--calls 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

from rlfleet.config import AlgorithmConfig, DataConfig
from rlfleet.data import PromptStream, load_prompt_dataset
from rlfleet.generation.generator import resolve_reward_funcs
from rlfleet.generation.reward_worker import InlineRewards, RewardWorker


def request(n_prompts: int = 4, n: int = 8, tokens: int = 24) -> dict:
    records = PromptStream(load_prompt_dataset(DataConfig(dataset="builtin:target_length"), "train"), 0).next_batch(
        n_prompts)
    rows = [r for r in records for _ in range(n)]
    return {"prompts": [r["prompt"] for r in rows], "completions": ["x" * tokens] * len(rows),
            "completion_ids": [[120] * tokens] * len(rows), "prompt_id": [r["prompt_id"] for r in rows],
            "target_length": [r["target_length"] for r in rows]}


def per_call_ms(runner, kwargs: dict, calls: int) -> float:
    runner.run([(0, kwargs)])  # warm
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        runner.run([(0, kwargs)])
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    funcs = resolve_reward_funcs(AlgorithmConfig(), DataConfig(dataset="builtin:target_length"))
    kwargs = request()
    start = time.perf_counter()
    worker = RewardWorker(funcs, 120.0, 8)
    first_start_s = time.perf_counter() - start
    inline = InlineRewards(funcs)

    class Direct:  # the function called as rlfleet called it before the worker
        def run(self, calls):
            return [funcs[k](**kw) for k, kw in calls]

    direct_ms = per_call_ms(Direct(), kwargs, args.calls)
    inline_ms, worker_ms = per_call_ms(inline, kwargs, args.calls), per_call_ms(worker, kwargs, args.calls)
    with open(f"/proc/{worker._box[0].proc.pid}/status") as status:
        rss_mib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
    restarts = []
    for _ in range(3):  # kill it as a crash would; the next call starts it again
        worker._box[0].proc.kill()
        worker._box[0].proc.wait()
        start = time.perf_counter()
        out = worker.run([(0, kwargs)])
        if out[0].status == "lost":  # the call raced the death: the next one restarts it
            out = worker.run([(0, kwargs)])
        restarts.append(time.perf_counter() - start)
    worker.close()
    print(f"reward call of one quickstart request ({len(kwargs['prompts'])} completions), median of {args.calls}:")
    print(f"  direct call {direct_ms:.3f} ms   InlineRewards {inline_ms:.3f} ms   worker process {worker_ms:.3f} ms   "
          f"added {worker_ms - direct_ms:.3f} ms per request over the direct call")
    print(f"worker start: first {first_start_s:.2f} s; after a crash (start + the call) "
          f"{statistics.median(restarts):.2f} s median of {len(restarts)}; resident memory {rss_mib:.0f} MiB")


if __name__ == "__main__":
    main()
