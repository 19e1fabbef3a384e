"""The learner's step on long-tailed completion lengths: padded micro-batches against packed ones.

``PolicyLearner.train_step`` (forward, backward, AdamW) on 4 groups x 8 completions of ``bench/long_tail.py``'s
lengths (geometric, mean 37, cap 256; prompts of 15-29 tokens), ``builtin:tiny``, float32, one thread, at each
micro-batch size, with ``learner.pack_sequences`` off (padded), on (rows no longer than the padded batch's), and
packed into one row of every sequence (what ``pack_sequences`` did before section 20; reached here through the
path rlfleet keeps for models whose logits are not ``head(hidden)``, forced by setting the soft-capping field, which
this model ignores). Each figure is the best of ``--repeats`` means over ``--steps`` steps of fresh groups; the
three configurations run interleaved in one process.

    python bench/pack_learner.py            # micro-batches of 8, 16 and 32
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import arg_parser, machine, pick, print_table, save_json  # noqa: E402

GROUPS, G, MEAN_LENGTH, CAP = 4, 8, 37, 256
MODES = ("padded", "packed", "packed, one row")


def groups_of(rng, gen) -> list:
    """4 groups of 8 long-tailed completions of random ids (behaviour log-probs 0: the time does not depend on
    them)."""
    import numpy as np
    import torch

    from rlfleet.types import Group

    out = []
    for _ in range(GROUPS):
        prompt = rng.integers(3, 250, size=int(rng.integers(15, 30)))
        lengths = np.minimum(rng.geometric(1 / MEAN_LENGTH, size=G), CAP)
        ids = np.zeros((G, int(lengths.max())), dtype=np.int64)
        for j, n in enumerate(lengths):
            ids[j, :n] = torch.randint(3, 250, (int(n),), generator=gen).numpy()
        out.append(Group(prompt_id=str(len(out)), prompt_token_ids=prompt.astype(np.int32),
                         completion_ids=ids.astype(np.int32), completion_lengths=lengths.astype(np.int32),
                         behaviour_logprobs=np.zeros(ids.shape, dtype=np.float32),
                         rewards=rng.normal(size=G).astype(np.float32),
                         advantages=rng.normal(size=G).astype(np.float32), truncated=lengths >= CAP,
                         policy_version=0))
    return out


def learner(mode: str, micro_batch: int):
    from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, ModelConfig
    from rlfleet.learner.policy import PolicyLearner

    built = PolicyLearner(ModelConfig(dtype="float32"), AlgorithmConfig(),
                          LearnerConfig(device="cpu", learning_rate=1e-6, micro_batch_size=micro_batch,
                                        pack_sequences=mode != "padded"),
                          GenerationConfig(num_generations=G, generation_batch_size=GROUPS * G,
                                           max_completion_length=CAP), seed=0)
    if mode == "packed, one row":
        built.model.config.final_logit_softcapping = 30.0
    return built


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(1)
    steps, repeats = pick(args.mode, 2, 4, 4), pick(args.mode, 1, 3, 5)
    rows = []
    for micro_batch in args.micro_batches:
        learners = {mode: learner(mode, micro_batch) for mode in MODES}
        best = {mode: float("inf") for mode in MODES}
        rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
        for mode in MODES:  # warm-up
            learners[mode].train_step(groups_of(rng, gen))
        for _ in range(repeats):
            batches = [groups_of(rng, gen) for _ in range(steps)]
            for mode in MODES:
                t0 = time.perf_counter()
                for batch in batches:
                    learners[mode].train_step(batch)
                best[mode] = min(best[mode], (time.perf_counter() - t0) / steps)
        row = {"micro_batch": micro_batch, **{f"{mode} s": best[mode] for mode in MODES}}
        row["packed / padded"] = best["packed"] / best["padded"]
        row["one row / padded"] = best["packed, one row"] / best["padded"]
        rows.append(row)
        print(f"  micro-batch {micro_batch}: " + ", ".join(f"{m} {best[m]:.3f} s" for m in MODES), flush=True)
    columns = ["micro_batch", *[f"{mode} s" for mode in MODES], "packed / padded", "one row / padded"]
    table = print_table(rows, columns, f"learner step, {GROUPS} x {G} long-tailed completions (mean {MEAN_LENGTH}, "
                        f"cap {CAP}), builtin:tiny, 1 thread, best of {repeats} x {steps} steps")
    save_json("pack_learner", {"machine": machine(), "rows": rows, "table": table}, args.out)


if __name__ == "__main__":
    main()
