"""Benchmark 8: a learner group (``cluster.learner_workers``): step time and memory per rank, 1 rank vs K ranks.

    .venv/bin/python bench/learner_group.py                       # CPU, gloo: 1 vs 2 ranks, builtin:small
    .venv/bin/python bench/learner_group.py --quick               # builtin:tiny, fewer steps
    .venv/bin/python bench/learner_group.py --device cuda --ranks 1 2 4 8   # GPU host, NCCL, rank r on GPU r

Each configuration runs ``PolicyLearner.train_step`` (GRPO, dapo, mu = 1) on the same synthetic batch in K spawned
processes forming one process group (:func:`rlfleet.learner.distributed.spawn_group`), each rank holding an FSDP2
shard, then gathers the weights for a publication (``state_dict()``), as a job does after every step. Per rank it
reports: the median step time and publication time after one warm-up step, the bytes of parameters + gradients +
AdamW state it holds (sharding divides these by K), and its peak resident memory (``ru_maxrss``, whole process).

On this 2-core CPU machine 2 ranks cannot be faster than 1 (one rank already uses both cores for its matmuls; the
gather and reduce-scatter add work): the CPU figures show the memory split and the cost of the collectives. The
speedup a learner group buys is measured on GPUs (``--device cuda``), one rank per GPU.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import arg_parser, machine, pick, print_table, save_json, synthetic_groups  # noqa: E402


def one_rank(rank, model: str, device: str, steps: int, micro: int, groups) -> dict:
    import resource

    import torch

    from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, ModelConfig
    from rlfleet.learner import distributed as dist_
    from rlfleet.learner.policy import PolicyLearner

    if device == "cpu":
        torch.set_num_threads(max(1, (torch.get_num_threads()) // rank.world))
    learner = PolicyLearner(
        ModelConfig(name_or_path=model, dtype="auto"), AlgorithmConfig(loss_type="dapo"),
        LearnerConfig(device=device,  # cuda: spawn_group set this rank's GPU current learning_rate=1e-6,
                      micro_batch_size=micro, max_steps=steps + 1),
        GenerationConfig(num_generations=groups[0].size, generation_batch_size=groups[0].size * len(groups),
                         max_completion_length=groups[0].completion_ids.shape[1], temperature=1.0),
        rank=rank)
    step_s, publish_s = [], []
    for i in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        learner.train_step(groups)
        sync(device)
        middle = time.perf_counter()
        state = learner.state_dict()
        del state
        sync(device)
        if i:  # the first step is the warm-up
            step_s.append(middle - start)
            publish_s.append(time.perf_counter() - middle)
    held = sum(dist_.local(p).numel() * 4 * 2 for p in learner.model.parameters())  # fp32 params + grads
    held += sum(dist_.local(v).numel() * v.element_size() for s in learner.optimizer.state.values()
                for v in s.values() if v.dim())
    out = {"rank": rank.rank, "step_s": statistics.median(step_s), "publish_s": statistics.median(publish_s),
           "state_gib": held / 2**30, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    model = pick(args.mode, "builtin:tiny", "builtin:small", "builtin:small")
    steps = pick(args.mode, 2, 4, 8)
    groups = synthetic_groups(4, 8, 64, pick(args.mode, 64, 192, 448))
    from rlfleet.learner.distributed import spawn_group

    rows, results = [], {"machine": machine(), "model": model, "device": args.device, "steps": steps,
                         "batch": f"4 groups x 8 completions of {groups[0].completion_ids.shape[1]}, prompt 64",
                         "runs": {}}
    for k in args.ranks:
        per_rank = spawn_group(k, one_rank, model, args.device, steps, 8, groups, device=args.device)
        results["runs"][k] = per_rank
        base = max(r["step_s"] for r in results["runs"][args.ranks[0]])
        step = max(r["step_s"] for r in per_rank)
        rows.append({"ranks": k, "step s": step, "publish s": max(r["publish_s"] for r in per_rank),
                     "params+grads+Adam per rank GiB": per_rank[0]["state_gib"],
                     "peak RSS per rank GiB": max(r["peak_rss_gib"] for r in per_rank),
                     "speed vs first": base / step,
                     **({"peak GPU GiB": max(r["peak_gpu_gib"] for r in per_rank)} if args.device == "cuda" else {})})
    columns = ["ranks", "step s", "publish s", "params+grads+Adam per rank GiB", "peak RSS per rank GiB",
               "speed vs first"] + (["peak GPU GiB"] if args.device == "cuda" else [])
    results["table"] = print_table(rows, columns, f"learner group on {args.device}, {model}")
    save_json("learner_group", results, args.out)


if __name__ == "__main__":
    main()
