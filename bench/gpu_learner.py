"""Benchmark 6: the policy learner on a GPU: step time and model FLOPs utilisation (MFU) of a ~0.5B Qwen2.

    .venv/bin/python bench/gpu_learner.py [--quick | --full] [--peak-tflops X]

Runs only where CUDA is available; elsewhere it prints that it was skipped (and saves that), so it is safe to run
anywhere. ``--cpu-smoke`` runs the same code on the CPU with rlfleet's tiny model, to check the script itself.

rlfleet's ``PolicyLearner`` (GRPO, loss ``dapo``, mu = 1, beta = 0) with the learner's own precision policy on
CUDA: float32 master weights and AdamW, forward and backward under bfloat16 autocast (``model.dtype: auto``). The
model is a random-init Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864,
vocabulary 151936, tied embeddings: 494M parameters), built offline. Batches are synthetic groups: a 128-token
prompt and G = 8 completions of 512 tokens, 8 groups per step (64 sequences, 40960 tokens), micro-batches of 8.

Model FLOPs per step (one forward + backward, counted on real tokens, as for MFU):
``6 * N_layers * tokens + 6 * d * V * completion_positions + 12 * L * d * S_mean * tokens``: the transformer
matmuls (N_layers = parameters outside embeddings and norms), the LM head on the completion positions only
(``logits_to_keep``), and causal attention (QK^T and AV, 4 d FLOPs per key forward, x3 with backward; S_mean =
(S + 1) / 2 keys per query). ``MFU = model FLOPs / step time /
peak``, with the GPU's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s; ``--peak-tflops`` for others). Also reported:
``packed_weights()`` (the bf16 host copy the learner publishes every step, into its reused buffer) and the peak GPU memory.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import arg_parser, machine, model_path, print_table, save_json, setup_env  # noqa: E402

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936)
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def build_qwen_05b() -> str:
    """Random-init Qwen2 of Qwen2.5-0.5B's shape with rlfleet's byte tokenizer, saved once to the cache (offline).
    Token ids stay below 260, so the large vocabulary only costs what it costs in the LM head."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlfleet.models import EOS_ID, PAD_ID, build_tiny_tokenizer, cache_dir

    target = cache_dir() / "bench-models" / "qwen2-0.5b-shape-v1"
    if (target / "config.json").is_file():
        return str(target)
    config = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=EOS_ID,
                         pad_token_id=PAD_ID, torch_dtype="float32", **QWEN_05B)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(tmp)
    tmp.rename(target)
    return str(target)


def synthetic_groups(count: int, G: int, P: int, T: int, seed: int):
    from rlfleet.types import Group

    rng = np.random.default_rng(seed)
    groups = []
    for i in range(count):
        rewards = rng.random(G).astype(np.float32)
        std = float(rewards.std(ddof=1))
        groups.append(Group(
            prompt_id=str(i), prompt_token_ids=rng.integers(0, 256, P).astype(np.int32),
            completion_ids=rng.integers(0, 256, (G, T)).astype(np.int32),
            completion_lengths=np.full(G, T, dtype=np.int32),
            behaviour_logprobs=np.full((G, T), -5.0, dtype=np.float32), rewards=rewards,
            advantages=((rewards - rewards.mean()) / std).astype(np.float32),
            truncated=np.ones(G, dtype=bool), policy_version=0, reward_std=std))
    return groups


def model_flops(config, sequences: int, P: int, T: int) -> float:
    """Forward + backward FLOPs of one step on ``sequences`` rows of P prompt + T completion tokens."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q, o; k, v; gate, up, down
    tokens = sequences * (P + T)
    mean_context = (P + T + 1) / 2  # causal: position i attends to i + 1 keys
    attention = 12 * L * d * mean_context * tokens  # QK^T and AV: 4 d FLOPs per key forward, x3 with backward
    return 6 * L * per_layer * tokens + 6 * d * V * sequences * (T + 1) + attention


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU with the tiny model (checks only)")
    args = parser.parse_args()
    setup_env()
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu learner: skipped (no CUDA device here; this benchmark runs where a GPU is lent)", flush=True)
        save_json("gpu_learner", {"benchmark": "gpu_learner", "skipped": "no CUDA device", "machine": machine()},
                  args.out)
        return

    from transformers import AutoConfig

    from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, ModelConfig
    from rlfleet.learner.policy import PolicyLearner

    smoke = args.cpu_smoke
    path = model_path("tiny") if smoke else build_qwen_05b()
    P, T, G = (32, 32, 4) if smoke else (128, 512, 8)
    groups_per_step = 2 if smoke else 8
    micro = 8
    steps = 2 if smoke else {"quick": 5, "default": 10, "full": 30}[args.mode]
    config = AutoConfig.from_pretrained(path)
    learner = PolicyLearner(ModelConfig(name_or_path=path, max_model_len=P + T + 1), AlgorithmConfig(),
                            LearnerConfig(groups_per_step=groups_per_step, micro_batch_size=micro,
                                          learning_rate=1e-6, device="cpu" if smoke else "cuda"),
                            GenerationConfig(max_completion_length=T), seed=0)
    params = sum(p.numel() for p in learner.model.parameters())
    device = learner.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = [synthetic_groups(groups_per_step, G, P, T, seed=s) for s in range(steps + 2)]

    for groups in batches[:2]:  # warm-up: allocator, kernels, autocast caches
        learner.train_step(groups)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for groups in batches[2:]:
        sync()
        t0 = time.perf_counter()
        learner.train_step(groups)
        sync()
        times.append(time.perf_counter() - t0)
    learner.packed_weights()  # the first call allocates the host buffer
    t0 = time.perf_counter()
    learner.packed_weights()
    publish_s = time.perf_counter() - t0

    step_s = statistics.median(times)
    sequences = groups_per_step * G
    flops = model_flops(config, sequences, P, T)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    peak = None if smoke else peak_tflops(name, args.peak_tflops)
    row = {"device": name, "params_M": params / 1e6, "sequences": sequences, "tokens": sequences * (P + T),
           "micro_batch": micro, "steps": len(times), "step_s": step_s, "step_s_min": min(times),
           "tokens_per_s": sequences * (P + T) / step_s, "model_TFLOP": flops / 1e12,
           "achieved_TFLOPs": flops / step_s / 1e12, "peak_TFLOPs": peak,
           "MFU": flops / step_s / 1e12 / peak if peak else None, "publish_s": publish_s,
           "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    table = print_table([row], list(row), title="GPU learner: PolicyLearner.train_step, fp32 master weights + bf16 "
                                                "autocast; MFU = model FLOPs / step time / dense bf16 peak")
    save_json("gpu_learner-smoke" if smoke else "gpu_learner", {
        "benchmark": "gpu_learner", "mode": args.mode, "shape": {"P": P, "T": T, "G": G,
                                                                 "groups_per_step": groups_per_step},
        "machine": machine(), "rows": [row], "times": times, "table": table}, args.out)


if __name__ == "__main__":
    main()
