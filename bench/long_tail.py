"""Benchmark 14: long-tailed completion lengths (the reasoning-RL regime): request batching against continuous
generation with in-flight weight updates, and TRL.

    .venv/bin/python bench/long_tail.py [--quick | --full] [--steps N]

**The workload.** ``builtin:tiny`` with its EOS logit raised by a constant (the last layer writes a fixed vector
along the EOS embedding into the residual stream; the scale is calibrated here by sampling with transformers), so
that every token ends the completion with about the same probability: lengths are about geometric, mean about 40,
capped at 256 tokens (most short, a few at the cap). The learning rate is 1e-5 (vs_trl's 3e-3 unlearns the EOS boost
within a few steps: completions averaged 170-210 tokens in a trial run), so the distribution stays the workload
while the systems are timed and the reward curve stays flat. The task is ``builtin:char_count``, whose reward (the share of
the completion's bytes equal to the asked letter) does not depend on length. The built model is written to a
temporary directory; its measured length distribution (mean, median, p90, share at the cap) is printed and saved.

**The systems**, at equal samples per step (4 prompts x 8 completions), rlfleet's at each ``max_staleness`` of
``--staleness`` (default 1 and 4; reasoning-RL systems run at 4-8: AReaL's default bound is 4), compared with
request batching at the same bound (``samples_vs_batched``):

- rlfleet, ``generation.engine: batched`` (request batching, rlfleet until now): one ``generate()`` per request of
  4 prompts, weights loaded between requests;
- rlfleet, ``generation.engine: continuous`` with ``kv_on_update: keep`` and ``recompute``: requests of as many
  groups as the bound admits, every group's prompt joining the running engine and handed on the moment it ends,
  each publication loaded between two engine steps;
- the same continuous engines with ``replay.staleness_unit: token`` ("token bound"): admission waits for no
  straggler, and the learner masks tokens sampled more than ``max_staleness`` versions before its step;
- TRL's GRPOTrainer with Hugging Face generation, on 1 and 2 torch threads (the faster is the reference).

Per system: ``step_s`` (mean wall between step ends, steps 3..N-1), ``samples_per_s`` (32 / step_s), ``gen_s``
(the engines' busy time per step), ``engine_busy`` (gen_s / step_s: one engine), the continuous engine's loop
waiting for work (``engine_idle``) and loading weights between two steps (``engine_loading``), as shares of the
step, ``learner_s``, the token staleness
(mean lag of a trained token behind the weights it trains) and the most versions one group spanned, the mean
completion length, the continuous engine's mean batch (``engine_batch``: tokens over engine steps, each step sampling
one token of every running completion), under the token bound (``replay.staleness_unit: token``) the share of
sampled tokens the loss masked as older than the bound (``masked_frac``) and the tokens trained per second
(``trained_tokens_per_s``: samples/s x mean length x (1 - masked_frac)), and ``reward_first10`` /
``reward_last10``.

The machine's bound (``bound_s``, ``step_vs_bound``) is each rlfleet run's own work per step: its engine's time in
steps and its learner's time, each on one thread, so the step is at least the longer of the two, and at least
their sum over the machine's cores. No system doing that work steps faster here. (Until section 21 of RESULTS.md the
bound was the sum over the cores alone, which assumes either stage could use the other's idle core.) An engine's
weight loads are not in the bound: a system that loaded less would do less work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (LoadMonitor, arg_parser, load_line, mean, pick, pool_runs, print_table,  # noqa: E402
                          save_json, setup_env)

PROMPTS, G, CAP, MEAN_LENGTH = 4, 8, 256, 40
LR = 1e-5  # small: the workload (the length distribution) stays what it was built to be while the systems are timed
TASK = "char_count"
RLFLEET = {  # name -> overrides
    "rlfleet batched (request batching)": ["generation.engine=batched"],
    "rlfleet continuous, keep": ["generation.engine=continuous", "generation.kv_on_update=keep"],
    "rlfleet continuous, recompute": ["generation.engine=continuous", "generation.kv_on_update=recompute"],
    # request order: no group overtakes an earlier one, so admission need not hold new groups behind a straggler
    "rlfleet continuous, recompute, request order": ["generation.engine=continuous",
                                                     "generation.kv_on_update=recompute",
                                                     "replay.consume_order=request"],
    # the token bound: stragglers train with their tokens older than the bound masked, so none holds admission
    "rlfleet continuous, recompute, token bound": ["generation.engine=continuous",
                                                   "generation.kv_on_update=recompute",
                                                   "replay.staleness_unit=token"],
    "rlfleet continuous, keep, token bound": ["generation.engine=continuous", "generation.kv_on_update=keep",
                                              "replay.staleness_unit=token"],
    # twice the default cap on the groups generating: a fuller engine, more tokens masked
    "rlfleet continuous, recompute, token bound, 2x in flight": ["generation.engine=continuous",
                                                                 "generation.kv_on_update=recompute",
                                                                 "replay.staleness_unit=token", "inflight=2x"],
}
TRL_SYSTEMS = {"TRL GRPOTrainer, HF generate, 1 thread": ["trl", "1"],
               "TRL GRPOTrainer, HF generate, 2 threads": ["trl", "2"]}


def systems(staleness: list[int]) -> dict[str, list[str]]:
    """Every rlfleet system at each ``max_staleness``, then TRL (synchronous: on-policy). ``inflight=2x``: twice the
    token unit's default ``max_inflight_groups``, (S + 1) x PROMPTS."""
    out = {f"{name}, S={s}": ["rlfleet", f"replay.max_staleness={s}",
                              *[f"generation.max_inflight_groups={2 * (s + 1) * PROMPTS}" if o == "inflight=2x" else o
                                for o in overrides]]
           for s in staleness for name, overrides in RLFLEET.items()}
    return out | TRL_SYSTEMS


TRL = ("TRL GRPOTrainer, HF generate, 1 thread", "TRL GRPOTrainer, HF generate, 2 threads")


def eos_boosted(model, scale: float):
    """``model`` with ``scale`` x the EOS embedding's direction added to the residual stream by the last layer's
    attention output (its value projection made constant), the rest of the layer kept."""
    import torch

    from rlfleet.models import EOS_ID

    layer, emb = model.model.layers[-1], model.model.embed_tokens.weight
    with torch.no_grad():
        u = emb[EOS_ID] / emb[EOS_ID].norm()
        layer.self_attn.v_proj.weight.zero_()
        layer.self_attn.v_proj.bias.fill_(1.0)
        width = layer.self_attn.o_proj.weight.shape[1]
        layer.self_attn.o_proj.weight.copy_(torch.outer(u, torch.ones(width)) * scale / width)
    return model


def sampled_lengths(model, tokenizer, samples: int = 64, seed: int = 0) -> list[int]:
    """Completion lengths (EOS included) of ``samples`` completions of char_count prompts, at temperature 1."""
    import torch

    from rlfleet.config import DataConfig
    from rlfleet.data import load_prompt_dataset
    from rlfleet.generation.generator import prompt_token_ids
    from rlfleet.models import EOS_ID

    rows = load_prompt_dataset(DataConfig(dataset=f"builtin:{TASK}"), "train", seed=0)
    torch.manual_seed(seed)
    lengths = []
    for i in range(samples // G):
        ids = torch.tensor([prompt_token_ids(tokenizer, rows[i]["prompt"])] * G)
        with torch.no_grad():
            # the whole vocabulary, as vLLM and TRL sample it (transformers' default top_k 50 would cut the tail
            # and shorten completions: a first calibration measured 35 tokens that ran as 100-110 in the jobs)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=CAP, eos_token_id=EOS_ID,
                                 pad_token_id=EOS_ID)[:, ids.shape[1]:]
        for row in out.tolist():
            lengths.append(row.index(EOS_ID) + 1 if EOS_ID in row else CAP)
    return lengths


def build_model(directory: Path) -> dict:
    """The long-tail model in ``directory``: the EOS boost's scale bisected until the mean sampled length is within
    10% of MEAN_LENGTH. Returns its length distribution."""
    from rlfleet.models import load_causal_lm, load_tokenizer, resolve_model_path

    base = resolve_model_path("builtin:tiny")
    tokenizer = load_tokenizer(base)
    low, high = 0.01, 1.0  # the mean length falls as the scale grows (measured: 73 tokens at 0.05, 30 at 0.1)
    for _ in range(10):
        scale = math.sqrt(low * high)
        lengths = sampled_lengths(eos_boosted(load_causal_lm(base).eval(), scale), tokenizer)
        print(f"  EOS boost {scale:.2f}: mean length {mean(lengths):.1f}", flush=True)
        if abs(mean(lengths) - MEAN_LENGTH) <= 0.1 * MEAN_LENGTH:
            break
        low, high = (scale, high) if mean(lengths) > MEAN_LENGTH else (low, scale)
    model = eos_boosted(load_causal_lm(base), scale)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    lengths = sorted(sampled_lengths(model.eval(), tokenizer, samples=256, seed=1))
    return {"eos_boost": scale, "samples": len(lengths), "mean": mean(lengths), "median": lengths[len(lengths) // 2],
            "p90": lengths[int(0.9 * len(lengths))], "max": lengths[-1],
            "at_cap": sum(n >= CAP for n in lengths) / len(lengths)}


def worker(kind: str, args: list[str], model_dir: str, steps: int, result: Path) -> None:
    from bench import vs_trl

    if kind == "rlfleet":
        overrides = [f"model.name_or_path={model_dir}", "model.max_model_len=512", f"learner.learning_rate={LR}",
                     f"generation.max_completion_length={CAP}", *args]
        staleness = int(next(a for a in args if a.startswith("replay.max_staleness=")).split("=")[1])
        vs_trl.worker_rlfleet("grpo", "tiny", steps, staleness, result, TASK, overrides=overrides)
    else:
        vs_trl.worker_trl_grpo("tiny", steps, False, result, TASK, int(args[0]), path=model_dir,
                               completion_length=CAP, lr=LR)


def launch(name: str, worker_args: list[str], model_dir: Path, steps: int, workdir: Path) -> dict:
    result = workdir / f"run-{time.monotonic_ns()}.json"
    kind, *args = worker_args
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--model-dir", str(model_dir),
               "--steps", str(steps), "--result", str(result), *[f"--arg={a}" for a in args]]
    t0 = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {name}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
        return {"system": name, "failed": True, "error_tail": tail}
    data = json.loads(result.read_text())
    ends, timed = data["step_end"], slice(2, -1)
    row = {"system": name, "steps": len(ends), "step_s": mean([b - a for a, b in zip(ends, ends[1:])][1:-1]),
           "total_s": time.time() - t0, "reward_first10": mean(data["reward"][:10]),
           "reward_last10": mean(data["reward"][-10:])}
    for key in ("learner_s", "gen_s", "sync_s", "token_staleness", "version_span", "completion_length",
                "engine_batch", "masked_frac", "engine_idle_s", "engine_load_s"):
        values = [v for v in (data.get(key) or [])[timed] if v is not None]
        if values:
            row[key] = mean(values) if key != "version_span" else max(values)
    dropped = [v for v in (data.get("dropped_stale") or []) if v is not None]
    if dropped:  # groups generated and dropped as stale, per group trained
        row["dropped_per_trained"] = dropped[-1] / (PROMPTS * len(ends))
    row["samples_per_s"] = PROMPTS * G / row["step_s"]
    if row.get("completion_length") is not None:  # the tokens the loss trained (the token bound masks some)
        row["trained_tokens_per_s"] = (row["samples_per_s"] * row["completion_length"]
                                       * (1 - row.get("masked_frac", 0.0)))
    if row.get("gen_s") is not None:
        row["engine_busy"] = row["gen_s"] / row["step_s"]
    if row.get("engine_idle_s") is not None:  # the continuous loop's time out of its steps, as a share of the step
        row["engine_idle"] = row.pop("engine_idle_s") / row["step_s"]
        row["engine_loading"] = row.pop("engine_load_s", 0.0) / row["step_s"]
    print(f"  {name}: step {row['step_s']:.3f} s, {row['samples_per_s']:.1f} samples/s", flush=True)
    return row


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 4],
                        help="rlfleet's replay.max_staleness values (each system at each)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the systems whose names contain one of these (e.g. 'batched' 'token bound')")
    parser.add_argument("--set", nargs="+", default=[], help="extra overrides for every rlfleet system (its name "
                        "says so), e.g. generation.max_inflight_groups=8")
    parser.add_argument("--worker", choices=["rlfleet", "trl"], help=argparse_suppress())
    parser.add_argument("--arg", action="append", default=[], help=argparse_suppress())
    parser.add_argument("--model-dir", help=argparse_suppress())
    parser.add_argument("--result", type=Path, help=argparse_suppress())
    args = parser.parse_args()
    setup_env()
    if args.worker:
        worker(args.worker, args.arg, args.model_dir, args.steps, args.result)
        return
    steps = args.steps or pick(args.mode, 8, 16, 16)
    table_systems = {name + "".join(f", {o}" for o in args.set if a[0] == "rlfleet"):
                     a + (args.set if a[0] == "rlfleet" else []) for name, a in systems(args.staleness).items()
                     if not args.only or any(part in name for part in args.only)}
    names = list(table_systems)
    order = names + (names[::-1] if args.mode == "full" else [])
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-longtail-"))
    model_dir = workdir / "long-tail-tiny"
    cores = os.cpu_count() or 1
    print(f"long tail: building the model (geometric lengths, mean ~{MEAN_LENGTH}, cap {CAP})", flush=True)
    lengths = build_model(model_dir)
    print(f"  lengths: {lengths}", flush=True)
    with LoadMonitor() as load:
        results = [launch(name, table_systems[name], model_dir, steps, workdir) for name in order]
    shutil.rmtree(workdir, ignore_errors=True)

    rows = pool_runs(results, names)
    ok = [r for r in rows if not r.get("failed")]
    trl = min((r for r in ok if r["system"] in TRL), key=lambda r: r["step_s"], default=None)
    for r in ok:
        if trl is not None:
            r["step_vs_trl"] = r["step_s"] / trl["step_s"]
        batched = next((b for b in ok if b["system"].startswith("rlfleet batched")
                        and b["system"].split(", S=")[-1] == r["system"].split(", S=")[-1]), None)
        if batched is not None and r["system"].startswith("rlfleet"):  # at the same staleness bound
            r["samples_vs_batched"] = r["samples_per_s"] / batched["samples_per_s"]
        if r.get("gen_s") is not None:
            r["bound_s"] = max(r["gen_s"], r["learner_s"], (r["gen_s"] + r["learner_s"]) / cores)
            r["step_vs_bound"] = r["step_s"] / r["bound_s"]
    table = print_table(rows, ["system", "runs", "steps", "step_s", "samples_per_s", "samples_vs_batched",
                               "step_vs_trl", "gen_s", "engine_busy", "engine_idle", "engine_loading", "learner_s",
                               "sync_s", "bound_s",
                               "step_vs_bound", "token_staleness", "version_span", "completion_length", "engine_batch",
                               "masked_frac", "dropped_per_trained", "trained_tokens_per_s",
                               "reward_first10", "reward_last10", "total_s"],
                        title=f"Long-tailed lengths (builtin:tiny, EOS boosted: mean {lengths['mean']:.1f}, median "
                              f"{lengths['median']}, p90 {lengths['p90']}, {lengths['at_cap']:.1%} at the cap {CAP}),"
                              f" {PROMPTS} x {G} samples per step, builtin:{TASK}")
    summary = load.summary()
    print(load_line(summary))
    save_json("long_tail", {"lengths": lengths, "rows": rows, "table": table, "load": summary, "steps": steps,
                            "mode": args.mode}, args.out)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
