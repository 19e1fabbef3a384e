"""Benchmark 16: the engine's decode step by batch size, and what continuous batching can gain from it on this machine.

    .venv/bin/python bench/decode_batch.py [--quick | --full] [--model tiny|small]

Continuous batching wins back the engine steps that request batching spends on a request's stragglers: the last
steps of a request decode few sequences, and the engine's step costs about as much for 2 sequences as for 32 where a
step is bound by reading the weights (a GPU at small batch). Where a step's cost grows with its batch, those steps
are cheap and there is little to win. This script measures which holds here.

1. **Step time by batch.** vLLM (the engine rlfleet runs, one torch thread as a generator actor of one CPU has)
   decodes ``b`` sequences of exactly ``L`` tokens (``ignore_eos``), ``b`` in 1..64; ``step_ms`` = wall / L (the
   prefill included, one step of L); the line ``step(b) = a + c b`` fitted by least squares: ``a`` is what a step
   costs whatever its batch, ``c`` each sequence.
2. **The bound on continuous batching's gain, for long-tailed lengths.** Requests of 4 prompts x 8 completions whose
   lengths are geometric with mean 37, capped at 256 (bench/long_tail.py's workload), seeded: request batching takes
   ``sum_t step(b_t)`` per request, ``b_t`` the completions still running at step t; an engine kept full at ``B``
   sequences (continuous batching's best case, no admission limit) ``tokens x step(B) / B``; request batching's
   mean batch (tokens over steps, a request taking as many steps as its longest completion). Their ratio is the most
   continuous batching could speed up generation of these lengths on this machine; the same ratio for a step of
   constant cost (``c = 0``, a weight-bound GPU step) is printed beside it.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import LoadMonitor, arg_parser, load_line, mean, pick, print_table, save_json, setup_env  # noqa: E402

PROMPTS, G, CAP, MEAN_LENGTH = 4, 8, 256, 37


def step_times(model: str, batches: list[int], length: int, repeats: int) -> dict[int, float]:
    """Seconds per engine step decoding ``b`` sequences of ``length`` tokens, best of ``repeats``."""
    import torch

    torch.set_num_threads(1)
    from vllm import SamplingParams

    from rlfleet.config import GenerationConfig, ModelConfig
    from rlfleet.generation.engine import Engine
    from rlfleet.models import resolve_model_path

    engine = Engine(ModelConfig(name_or_path=resolve_model_path(f"builtin:{model}"), max_model_len=512),
                    GenerationConfig(max_completion_length=length), seed=0)
    prompt = {"prompt_token_ids": list(b"Count the letters: ")}
    params = SamplingParams(n=1, max_tokens=length, min_tokens=length, ignore_eos=True, temperature=1.0,
                            detokenize=False)
    engine.llm.generate([prompt] * 4, params, use_tqdm=False)  # warm-up
    out = {}
    for b in batches:
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = engine.llm.generate([prompt] * b, params, use_tqdm=False)
            walls.append(time.perf_counter() - t0)
            assert all(len(r.outputs[0].token_ids) == length for r in results)
        out[b] = min(walls) / length
        print(f"  batch {b}: {out[b] * 1000:.2f} ms a step", flush=True)
    return out


def fit(times: dict[int, float]) -> tuple[float, float]:
    """Least-squares ``a + c b`` through the measured step times."""
    xs, ys = list(times), list(times.values())
    mx, my = mean(xs), mean(ys)
    c = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - c * mx, c


def long_tail_gain(a: float, c: float, requests: int = 2000, seed: int = 0) -> dict[str, float]:
    """Request batching against an engine kept full at ``B = PROMPTS x G``, for seeded geometric lengths."""
    rng = random.Random(seed)
    p = 1 / MEAN_LENGTH
    batched = tokens = steps = 0.0
    B = PROMPTS * G
    for _ in range(requests):
        lengths = [min(CAP, 1 + int(math.log(rng.random()) / math.log(1 - p))) for _ in range(B)]
        for t in range(1, max(lengths) + 1):
            batched += a + c * sum(1 for n in lengths if n >= t)
        tokens += sum(lengths)
        steps += max(lengths)
    full = tokens * (a + c * B) / B
    return {"mean_length": tokens / (requests * B), "batched_mean_batch": tokens / steps,
            "batched_s_per_token": batched / tokens, "full_s_per_token": full / tokens, "gain": batched / full}


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "small"])
    args = parser.parse_args()
    setup_env()
    batches = pick(args.mode, [1, 8, 32], [1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8, 16, 32, 64])
    length, repeats = pick(args.mode, 32, 64, 64), pick(args.mode, 1, 3, 5)
    print(f"decode step by batch: builtin:{args.model}, {length} tokens, best of {repeats}", flush=True)
    with LoadMonitor() as load:
        times = step_times(args.model, batches, length, repeats)
    a, c = fit(times)
    rows = [{"batch": b, "step_ms": t * 1000, "per_sequence_ms": t * 1000 / b, "fit_ms": (a + c * b) * 1000,
             "vs_batch_1": t / times[batches[0]]} for b, t in times.items()]
    table = print_table(rows, ["batch", "step_ms", "per_sequence_ms", "fit_ms", "vs_batch_1"],
                        title=f"vLLM decode step by batch (builtin:{args.model}, one thread): step = "
                              f"{a * 1000:.3f} ms + {c * 1000:.3f} ms x batch")
    here, gpu_like = long_tail_gain(a, c), long_tail_gain(a, 0.0)
    gains = [{"step model": "this machine (fitted)", **here},
             {"step model": "constant step (c = 0: weight-bound)", **gpu_like}]
    table2 = print_table(gains, ["step model", "mean_length", "batched_mean_batch", "batched_s_per_token",
                                 "full_s_per_token", "gain"],
                         title=f"Long-tailed lengths (geometric, mean {MEAN_LENGTH}, cap {CAP}; requests of "
                               f"{PROMPTS} x {G}): request batching against an engine kept full, generation time "
                               "per token")
    summary = load.summary()
    print(load_line(summary))
    save_json("decode_batch", {"model": args.model, "length": length, "fit": {"a_s": a, "c_s": c}, "rows": rows,
                               "long_tail": gains, "tables": [table, table2], "load": summary,
                               "cores": os.cpu_count()}, args.out)


if __name__ == "__main__":
    main()
