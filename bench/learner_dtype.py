"""Benchmark 12: the learner's step on CPU in float32 and in bfloat16, with its attention in bfloat16 or float32.

    .venv/bin/python bench/learner_dtype.py [--quick | --full] [--threads N]

``PolicyLearner.train_step`` (GRPO, dapo, mu = 1) on one synthetic batch shaped like ``bench/vs_trl.py``'s (4 groups
x 8 completions, prompts of 20-39 tokens left-padded, completions of 4-24 tokens), for ``builtin:small`` (18M) and
``builtin:tiny``, in three settings:

- ``float32``: ``model.dtype: float32``, the CPU default;
- ``bfloat16, bf16 attention``: ``model.dtype: bfloat16`` with transformers' SDPA attention running under the
  autocast like the rest (what rlfleet did before ``rlfleet.models.float32_attention_on_cpu``, and what a stock
  transformers model does under bfloat16 autocast);
- ``bfloat16, fp32 attention``: ``model.dtype: bfloat16`` as rlfleet runs it on CPU now: the attention's q, k, v in
  float32 with autocast off.

One learner per model; the settings alternate in rounds (A B C, A B C, ...), each round timing ``steps`` steps after
one untimed step, and the table gives each setting's median round. Torch threads: ``--threads`` (1, as a learner
actor of 1 CPU has). The gain depends on the CPU: bfloat16 matrix products run on AMX / AVX512-BF16 units where the
CPU has them (``lscpu``: ``amx_bf16``, ``avx512_bf16``), and emulated, slower than float32, where it does not.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (LoadMonitor, arg_parser, load_line, machine, pick, print_table, save_json,  # noqa: E402
                          synthetic_groups)

SETTINGS = ["float32", "bfloat16, bf16 attention", "bfloat16, fp32 attention"]


def measure(model: str, rounds: int, steps: int) -> list[dict]:
    from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, ModelConfig
    from rlfleet.learner.policy import PolicyLearner
    from rlfleet.models import FLOAT32_ATTENTION

    def learner(dtype: str) -> PolicyLearner:
        return PolicyLearner(
            ModelConfig(name_or_path=f"builtin:{model}", dtype=dtype), AlgorithmConfig(loss_type="dapo", beta=0.0),
            LearnerConfig(device="cpu", learning_rate=3e-3, micro_batch_size=32, groups_per_step=4),
            GenerationConfig(num_generations=8, generation_batch_size=32, max_completion_length=24), seed=0)

    fp32, bf16 = learner("float32"), learner("bfloat16")
    assert bf16.model.config._attn_implementation == FLOAT32_ATTENTION
    groups = synthetic_groups(4, 8, 39, 24, min_prompt=20, min_completion=4)  # left-padded prompts, ragged ends
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for _ in range(rounds):
        for setting in SETTINGS:
            target = fp32 if setting == "float32" else bf16
            if setting != "float32":
                target.model.set_attn_implementation("sdpa" if "bf16 attention" in setting else FLOAT32_ATTENTION)
            target.train_step(groups)  # untimed: allocator and oneDNN caches of this setting
            start = time.perf_counter()
            for _ in range(steps):
                target.train_step(groups)
            times[setting].append((time.perf_counter() - start) / steps)
    base = statistics.median(times["float32"])
    return [{"model": f"builtin:{model}", "setting": s, "rounds": rounds, "step_s": statistics.median(times[s]),
             "vs_float32": statistics.median(times[s]) / base, "rounds_s": [round(t, 4) for t in times[s]]}
            for s in SETTINGS]


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a learner actor of 1 CPU has 1)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rounds, steps = pick(args.mode, 2, 3, 5), pick(args.mode, 1, 3, 3)
    models = pick(args.mode, ["tiny"], ["small", "tiny"], ["small", "tiny"])
    with LoadMonitor() as load:
        rows = [row for model in models for row in measure(model, rounds, steps)]
    table = print_table(rows, ["model", "setting", "rounds", "step_s", "vs_float32"],
                        title=f"learner train_step on CPU, {args.threads} thread(s): median of {rounds} rounds of "
                              f"{steps} steps")
    summary = load.summary()
    print(load_line(summary))
    save_json("learner_dtype", {"benchmark": "learner_dtype", "mode": args.mode, "threads": args.threads,
                                "machine": machine(), "load": summary, "rows": rows, "tables": [table]}, args.out)


if __name__ == "__main__":
    main()
