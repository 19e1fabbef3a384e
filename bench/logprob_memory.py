"""Learner peak memory and time of the completion log-probs: whole [B, T, V] logits vs ``learner.logprob_chunk_tokens``.

One forward + backward of ``completion_logprobs`` (what a learner micro-batch does) on a random-init model with
Qwen3-0.6B's vocabulary (151,936 tokens, tied embeddings) and width (hidden 1024, 16 heads, 8 KV heads, head_dim 128,
MLP 3072), built offline. Depth does not change the logits' share of memory, so the default run keeps 2 of the 28
layers (``--layers 28`` for the real shape, ~10x slower here). Each configuration runs in its own process; a thread
samples the process's RSS every 5 ms, and the figure is the peak during the pass minus the RSS before it (model,
batch and optimizer-free gradients' buffers included once the pass allocates them). The two runs' log-probs and
gradients are compared too.

    python bench/logprob_memory.py            # B=8, P=65, T=448: the shipped Qwen3 job's micro-batch (8 x 513)
    python bench/logprob_memory.py --quick    # B=4, T=192, chunk 256
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import arg_parser, machine, pick, print_table, save_json  # noqa: E402

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=4096)


def one_pass(layers: int, batch: int, prompt: int, completion: int, chunk: int, mixed: bool, pack: bool,
             queue) -> None:
    import psutil
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlfleet.learner.logprobs import completion_logprobs
    from rlfleet.learner.policy import Batch

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3", num_hidden_layers=layers, **QWEN3_06B)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, QWEN3_06B["vocab_size"], (batch, prompt + completion), generator=gen)
    attention = torch.ones_like(ids)
    if mixed:  # completion lengths spread evenly from T/8 to T, right-padded as collate pads them
        for row, length in enumerate(torch.linspace(completion / 8, completion, batch).long().tolist()):
            attention[row, prompt + length:] = 0
            ids[row, prompt + length:] = 0
    data = Batch(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                 completion_ids=ids[:, prompt:], mask=attention[:, prompt:].float(),
                 behaviour_logprobs=torch.zeros(batch, completion), advantages=torch.zeros(batch))
    weights = torch.randn(batch, completion, generator=gen)
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    before = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    logprobs = completion_logprobs(model, data, temperature=1.0, chunk_tokens=chunk, pack=pack) * data.mask
    (logprobs * weights).sum().backward()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    head_grad = model.get_output_embeddings().weight.grad
    queue.put({"peak_gib": (peak[0] - before) / 2**30, "seconds": seconds, "logprobs": logprobs.detach().numpy(),
               "head_grad_norm": head_grad.norm().item(), "head_grad_sample": head_grad[:64, :64].numpy().copy()})


def run(layers, batch, prompt, completion, chunk, mixed=False, pack=False) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=one_pass, args=(layers, batch, prompt, completion, chunk, mixed, pack, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    batch, completion, chunk = pick(args.mode, (4, 192, 256), (8, 448, 1024), (8, 448, 1024))
    prompt = 65
    positions = batch * completion
    logits_gib = positions * QWEN3_06B["vocab_size"] * 4 / 2**30
    print(f"B={batch} P={prompt} T={completion} ({positions} completion positions), vocab "
          f"{QWEN3_06B['vocab_size']}, {args.layers} layers: one float32 copy of the logits is {logits_gib:.2f} GiB",
          flush=True)
    whole = run(args.layers, batch, prompt, completion, 0)
    chunked = run(args.layers, batch, prompt, completion, chunk)
    lp_diff = float(abs(whole["logprobs"] - chunked["logprobs"]).max())  # numpy arrays (a queue cannot carry
    grad_diff = float(abs(whole["head_grad_sample"] - chunked["head_grad_sample"]).max()  # a dead process's tensors)
                      / abs(whole["head_grad_sample"]).max())
    rows = [{"logits": "whole [B, T, V]", "peak_gib": whole["peak_gib"], "seconds": whole["seconds"]},
            {"logits": f"chunks of {chunk} positions", "peak_gib": chunked["peak_gib"], "seconds": chunked["seconds"]}]
    table = print_table(rows, ["logits", "peak_gib", "seconds"], "completion log-probs: forward + backward")
    ratio = whole["peak_gib"] / chunked["peak_gib"]
    print(f"peak memory whole / chunked: x{ratio:.2f}; time chunked / whole: "
          f"x{chunked['seconds'] / whole['seconds']:.2f}; max |log-prob difference| {lp_diff:.2e}; head gradient "
          f"max relative difference {grad_diff:.2e} (norms {whole['head_grad_norm']:.6g} / "
          f"{chunked['head_grad_norm']:.6g})", flush=True)
    # Mixed lengths (T/8 .. T): the padded micro-batch computes the decoder on every padded position; packed, on
    # the real tokens only (learner.pack_sequences). Both with chunked logits.
    padded = run(args.layers, batch, prompt, completion, chunk, mixed=True)
    packed = run(args.layers, batch, prompt, completion, chunk, mixed=True, pack=True)
    pack_diff = float(abs(padded["logprobs"] - packed["logprobs"]).max())
    pack_rows = [{"micro-batch (mixed lengths)": name, "peak_gib": r["peak_gib"], "seconds": r["seconds"]}
                 for name, r in (("padded", padded), ("packed", packed))]
    pack_table = print_table(pack_rows, ["micro-batch (mixed lengths)", "peak_gib", "seconds"],
                             f"completion lengths T/8 .. T, chunks of {chunk}: padded vs packed (pack_sequences)")
    print(f"packed / padded: time x{packed['seconds'] / padded['seconds']:.2f}, peak memory "
          f"x{packed['peak_gib'] / padded['peak_gib']:.2f}; max |log-prob difference| {pack_diff:.2e}", flush=True)
    save_json("logprob_memory", {
        "machine": machine(), "layers": args.layers, "batch": batch, "prompt": prompt, "completion": completion,
        "chunk_tokens": chunk, "logits_copy_gib": logits_gib, "rows": rows, "peak_ratio": ratio,
        "max_logprob_diff": lp_diff, "head_grad_rel_diff": grad_diff, "table": table,
        "packing": {"rows": pack_rows, "max_logprob_diff": pack_diff, "table": pack_table}}, args.out)


if __name__ == "__main__":
    main()
