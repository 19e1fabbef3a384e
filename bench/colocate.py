"""Benchmark: one machine, one copy (issue 34): the learner and the engine colocated, against separate actors and TRL.

    .venv/bin/python bench/colocate.py [--quick | --full] [--part big|small|both] [--systems NAME ...]

**big**: a random-init model of Qwen3-0.6B's shape (596M parameters, 151,936-token vocabulary, tied embeddings; 28
layers, hidden 1024, built offline with rlfleet's byte tokenizer), float32, GRPO on ``builtin:target_length``
with 2 prompts x 4 completions x 32 tokens a step (the job issue 34 tried):

- rlfleet colocated (``cluster.colocate: true``, the learner's bundle holding both cores, 1 GiB of KV cache) at
  ``max_staleness`` 1 and 0, full fine-tuning and LoRA (r 16 on every linear layer), and with a bfloat16 engine
  (``generation.dtype``), with 1 GiB or 0.25 GiB of KV cache;
- rlfleet with separate actors, full fine-tuning: on a 24 GB machine the preflight refuses it (its message is kept
  in the results), which is what colocation is for; and with LoRA, which fits;
- TRL's ``GRPOTrainer`` on the same job with Hugging Face generation (one process, 2 torch threads), full and LoRA
  (peft, the same adapter).

**small**: ``builtin:small`` (18M) on the quickstart job (4 x 8 x 24), colocated against separate actors.

Each system runs in a process of its own, launched from here, so start-up counts as a user meets it. Memory is the
peak, over the run, of the proportional set size (PSS, ``/proc/<pid>/smaps_rollup``) summed over the process and
every process below it (Ray's GCS, raylet and workers descend from the job's process): pages shared between
processes (Ray's object store, libraries) count once in the sum. ``step_s`` is the mean gap between step ends over
steps 2..N (step 1 carries the engine's and the learner's first-use costs), ``first_step_s`` launch to the end of
step 1. The rlfleet rows' ``learner_s`` and ``gen_s`` are their own records' (the learner's step, the generator's
busy time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (QUIET, REPO, LoadMonitor, arg_parser, load_line, machine, mean, pick, pool_runs,  # noqa: E402
                          print_table, save_json, setup_env)
from bench.vs_trl import stamp_steps, step_clock  # noqa: E402

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 max_position_embeddings=4096)
BIG = dict(prompts=2, num_generations=4, completion_length=32, lr=1e-5)
SMALL = dict(prompts=4, num_generations=8, completion_length=24, lr=3e-3)
LORA = ["model.lora={r: 16}"]
COLOCATED = ["cluster.colocate=true", "cluster.learner_num_cpus=2"]
SYSTEMS = {  # name -> (part, worker, rlfleet overrides)
    "rlfleet colocated, staleness 1": ("big", "rlfleet", [*COLOCATED, "replay.max_staleness=1"]),
    "rlfleet colocated, staleness 0": ("big", "rlfleet", [*COLOCATED, "replay.max_staleness=0"]),
    "rlfleet colocated, LoRA r16": ("big", "rlfleet", [*COLOCATED, "replay.max_staleness=1", *LORA]),
    # the engine in bfloat16 beside the float32 learner: half the engine's copy of the weights
    "rlfleet colocated, bfloat16 engine": ("big", "rlfleet", [*COLOCATED, "replay.max_staleness=1",
                                                              "generation.dtype=bfloat16"]),
    # and its KV cache cut to what the job needs (a quarter GiB holds 2,340 tokens at this shape; every byte is resident)
    "rlfleet colocated, bfloat16 engine, 0.25 GiB KV": ("big", "rlfleet", [
        *COLOCATED, "replay.max_staleness=1", "generation.dtype=bfloat16", "generation.kv_cache_space_gib=0.25"]),
    "rlfleet separate actors": ("big", "rlfleet", ["replay.max_staleness=1"]),
    "rlfleet separate actors, LoRA r16": ("big", "rlfleet", ["replay.max_staleness=1", *LORA]),
    "TRL GRPOTrainer, HF generate": ("big", "trl", []),
    "TRL GRPOTrainer, HF generate, LoRA r16": ("big", "trl-lora", []),
    "small: rlfleet colocated": ("small", "rlfleet", [*COLOCATED, "replay.max_staleness=1"]),
    "small: rlfleet separate actors": ("small", "rlfleet", ["replay.max_staleness=1"]),
}


def build_qwen3_shape() -> str:
    """The Qwen3-0.6B shape, random init, rlfleet's byte tokenizer, saved once to the cache (offline). Sampled ids
    above the tokenizer's 260 decode to nothing; the length-based reward does not read the text."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlfleet.models import ENDOFTEXT_ID, EOS_ID, PAD_ID, build_tiny_tokenizer, cache_dir

    target = cache_dir() / "bench-models" / "qwen3-0.6b-shape-v1"
    if (target / "config.json").is_file():
        return str(target)
    config = AutoConfig.for_model("qwen3", eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=ENDOFTEXT_ID,
                                  torch_dtype="float32", **QWEN3_06B)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(tmp)
    os.replace(tmp, target)
    return str(target)


# ----------------------------------------------------------------------------------------------------------------
# Workers: one per process; each writes {"step_end": [epoch s], ...} to --result
# ----------------------------------------------------------------------------------------------------------------


def worker_rlfleet(model: str, job: dict, steps: int, overrides: list[str], result: Path) -> None:
    from rlfleet import cli

    stamps = stamp_steps()
    out = result.with_suffix(".run")
    code = cli.main([
        "train", str(REPO / "deploy" / "quickstart.yaml"), f"output_dir={out}", f"model.name_or_path={model}",
        f"learner.max_steps={steps}", f"generation.num_generations={job['num_generations']}",
        f"generation.generation_batch_size={job['prompts'] * job['num_generations']}",
        f"generation.max_completion_length={job['completion_length']}", f"learner.groups_per_step={job['prompts']}",
        f"learner.micro_batch_size={job['prompts'] * job['num_generations']}", f"learner.learning_rate={job['lr']}",
        "model.max_model_len=256", *QUIET, *overrides])
    shutil.rmtree(out, ignore_errors=True)
    result.write_text(json.dumps({
        "exit_code": code, "step_end": [t for t, _ in stamps],
        "learner_s": [r.get("time/learner_s") for _, r in stamps], "gen_s": [r.get("time/gen_s") for _, r in stamps],
        "sync_s": [r.get("sync/seconds") for _, r in stamps], "reward": [r.get("reward/mean") for _, r in stamps],
        "threads": [r.get("learner/threads") for _, r in stamps]}))


def worker_trl(model: str, job: dict, steps: int, lora: bool, result: Path) -> None:
    import torch

    torch.set_num_threads(2)
    from trl import GRPOConfig, GRPOTrainer

    from rlfleet.config import DataConfig
    from rlfleet.data import builtin_task, load_prompt_dataset
    from rlfleet.models import load_tokenizer
    from rlfleet.rewards import BUILTIN_REWARDS

    dataset = load_prompt_dataset(DataConfig(dataset="builtin:target_length"), "train", seed=0)
    clock = step_clock()
    args = GRPOConfig(
        output_dir=str(result.with_suffix(".run")), max_steps=steps, seed=0,
        per_device_train_batch_size=job["prompts"] * job["num_generations"], gradient_accumulation_steps=1,
        num_generations=job["num_generations"], max_completion_length=job["completion_length"],
        learning_rate=job["lr"], lr_scheduler_type="constant", loss_type="dapo", beta=0.0, epsilon=0.2,
        temperature=1.0, max_grad_norm=1.0, weight_decay=0.0, bf16=False, gradient_checkpointing=False,
        use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    peft = None
    if lora:
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    rewards = [BUILTIN_REWARDS[name] for name in builtin_task("builtin:target_length").reward_funcs]
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args,
                          train_dataset=dataset, processing_class=load_tokenizer(model), callbacks=[clock],
                          peft_config=peft)
    trainer.train()
    shutil.rmtree(result.with_suffix(".run"), ignore_errors=True)
    result.write_text(json.dumps({"exit_code": 0, "step_end": clock.step_end,
                                  "reward": [log.get("reward") for log in clock.logs]}))


# ----------------------------------------------------------------------------------------------------------------
# Launching, with the process tree's memory sampled
# ----------------------------------------------------------------------------------------------------------------


def process_label(pid: int, root: int) -> str:
    """What a process of the job is: the job's own (``root``), a Ray actor by class (``ray::ColocatedActor``), or
    another program by name (Ray's ``gcs_server``, ``raylet``, ``dashboard.py``, ...)."""
    if pid == root:
        return "the job's process (driver)"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(".")[0].split()[0]
    words = [a.decode(errors="replace") for a in argv if a]
    program = next((w for w in words[1:] if not w.startswith("-")), first) if "python" in first else first
    return Path(program).name


def tree_pss(root: int) -> dict[str, int]:
    """The PSS of ``root`` and every process below it, summed by :func:`process_label`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    by_label: dict[str, int] = {}
    frontier, seen = [root], set()
    while frontier:
        pid = frontier.pop()
        if pid in seen:
            continue
        seen.add(pid)
        frontier.extend(children.get(pid, []))
        try:
            pss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                       if line.startswith("Pss:"))
            label = process_label(pid, root)
        except (OSError, StopIteration):
            continue
        by_label[label] = by_label.get(label, 0) + pss
    return by_label


def launch(name: str, model: str, steps: int, workdir: Path) -> dict:
    part, worker, overrides = SYSTEMS[name]
    result = workdir / f"{worker}-{time.monotonic_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--model", model, "--part", part,
               "--steps", str(steps), "--result", str(result), *[f"--override={o}" for o in overrides]]
    t0 = time.time()
    # no OMP_NUM_THREADS here: Ray gives each actor its CPUs' worth only where the variable is unset (a colocated
    # actor of 2 CPUs then runs 2 threads), and TRL sets its own
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    # timeline: (wall time, PSS bytes) every 0.5 s; at_peak: the PSS by process at the peak
    peak, at_peak, done, timeline = [0], {}, threading.Event(), []

    def sample() -> None:
        while not done.wait(0.5):
            by_process = tree_pss(proc.pid)
            timeline.append((time.time(), sum(by_process.values())))
            if timeline[-1][1] > peak[0]:
                peak[0] = timeline[-1][1]
                at_peak.clear()
                at_peak.update(by_process)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    total_s = time.time() - t0
    row = {"system": name, "model": Path(model).name, "peak_gib": peak[0] / 2**30, "total_s": total_s,
           "peak_by_process_gib": {k: round(v / 2**30, 3) for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])}}
    data = json.loads(result.read_text()) if result.exists() else {}
    if proc.returncode != 0 or data.get("exit_code") != 0 or not data.get("step_end"):
        refused = [line for line in output.splitlines() if "cannot " in line or "needs about" in line
                   or "would fit" in line or "GiB" in line]
        row |= {"failed": True, "exit_code": data.get("exit_code", proc.returncode),
                "error_tail": "\n".join(refused) or output[-3000:]}
        print(f"  {name}: FAILED (exit {proc.returncode}, peak {row['peak_gib']:.1f} GiB)\n{row['error_tail']}",
              flush=True)
        return row
    ends = data["step_end"]
    row |= {"steps": len(ends), "step_s": mean([b - a for a, b in zip(ends, ends[1:])]),
            "first_step_s": ends[0] - t0 if ends else None, "reward_mean": mean(data.get("reward", [])),
            # where the peak falls: starting up (to the end of step 1) or training (after it)
            "peak_start_gib": max((b for t, b in timeline if t <= ends[0]), default=0) / 2**30,
            "peak_train_gib": max((b for t, b in timeline if t > ends[0]), default=0) / 2**30}
    for key in ("learner_s", "gen_s", "sync_s", "threads"):
        if data.get(key):
            row[key] = mean(data[key][1:])
    print(f"  {name}: step {row['step_s']:.2f} s, first step at {row['first_step_s']:.1f} s, peak "
          f"{row['peak_gib']:.2f} GiB, total {total_s:.0f} s", flush=True)
    print("    at the peak (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in row["peak_by_process_gib"].items()
                                            if v >= 0.02), flush=True)
    return row


def compare(rows: list[dict], reference: str) -> None:
    ref = next((r for r in rows if r["system"] == reference and not r.get("failed")), None)
    for r in rows:
        if ref is not None and not r.get("failed"):
            r["step_vs_ref"] = r["step_s"] / ref["step_s"]
            r["peak_vs_ref"] = r["peak_gib"] / ref["peak_gib"]


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--part", default="both", choices=["big", "small", "both"])
    parser.add_argument("--systems", nargs="+", default=None, help="rows to run, by name (default: every row)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--worker", choices=["rlfleet", "trl", "trl-lora"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_env()
    if args.worker:
        job = BIG if args.part == "big" else SMALL
        if args.worker == "rlfleet":
            worker_rlfleet(args.model, job, args.steps, args.override, args.result)
        else:
            worker_trl(args.model, job, args.steps, args.worker == "trl-lora", args.result)
        return

    from rlfleet.models import resolve_model_path

    parts = ["big", "small"] if args.part == "both" else [args.part]
    names = [n for n, (part, _, _) in SYSTEMS.items() if part in parts and (not args.systems or n in args.systems)]
    models = {"big": build_qwen3_shape() if "big" in parts else None, "small": resolve_model_path("builtin:small")}
    steps = {"big": args.steps or pick(args.mode, 3, 5, 8), "small": args.steps or pick(args.mode, 10, 30, 60)}
    order = names + (names[::-1] if args.mode == "full" else [])
    print(f"colocation: {order}; steps {steps}; {os.cpu_count()} cores", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-colocate-"))
    with LoadMonitor() as load:
        results = [launch(n, models[SYSTEMS[n][0]], steps[SYSTEMS[n][0]], workdir) for n in order]
    shutil.rmtree(workdir, ignore_errors=True)
    tables, rows = [], {}
    columns = ["system", "runs", "steps", "step_s", "step_vs_ref", "peak_gib", "peak_vs_ref", "peak_start_gib",
               "peak_train_gib", "learner_s", "threads",
               "gen_s", "sync_s", "first_step_s", "total_s"]
    for part, reference, title in (
            ("big", "TRL GRPOTrainer, HF generate",
             "Qwen3-0.6B shape, float32, 2 x 4 x 32 a step: step_vs_ref and peak_vs_ref against TRL (full)"),
            ("small", "small: rlfleet separate actors",
             "builtin:small (18M), quickstart job: against separate actors")):
        part_names = [n for n in names if SYSTEMS[n][0] == part]
        if not part_names:
            continue
        rows[part] = pool_runs(results, part_names)
        compare(rows[part], reference)
        tables.append(print_table(rows[part], columns, title=title))
    for r in rows.get("big", []):
        if r.get("failed"):
            print(f"\n{r['system']}: did not run:\n{r['error_tail']}")
    summary = load.summary()
    print(load_line(summary))
    save_json("colocate", {"benchmark": "colocate", "mode": args.mode, "big_job": BIG, "small_job": SMALL,
                           "qwen3_shape": QWEN3_06B, "steps": steps, "machine": machine(), "load": summary,
                           "rows": rows, "runs": results, "tables": tables}, args.out)


if __name__ == "__main__":
    main()
