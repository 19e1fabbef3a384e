"""The driver of ``rlfleet dpo``: DPO with BEMA reference updates, the program that ``ray job submit`` runs.

Phases, top to bottom (the conventions of ``rlfleet train``, :mod:`rlfleet.cluster.driver`):
1. validate what can be checked without actors (tokenizer, preference data, tokenized lengths), write the resolved
   ``config.json``;
2. connect to Ray (``cluster.address``, ``RAY_ADDRESS``, else a local cluster), reserve the learner's resources,
   start the :class:`~rlfleet.dpo.actor.DPOLearnerActor`, restore the latest checkpoint when resuming;
3. the loop: ``dpo.batch_size`` pairs per step from a seeded, checkpointed stream over the training split; one line
   of ``metrics.jsonl`` per step (loss, rewards chosen / rejected, margins, accuracies, BEMA events), held-out
   metrics (``eval/*``) at step 0 and every ``dpo.eval_steps``; a checkpoint every ``checkpoint.save_steps``;
4. a final checkpoint, the BEMA weights in Hugging Face format under ``output_dir/bema`` (TRL's place), the plot,
   ``summary.json`` and a clean shutdown (also on Ctrl-C / SIGTERM / ``ray job stop``).

A checkpoint ``checkpoints/step-N/`` holds ``learner/`` (policy in HF format, optimizer, scheduler, reference model,
BEMA state: see :meth:`~rlfleet.dpo.learner.DPOLearner.save`) and ``driver.json`` (step, stream cursor).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.driver import RunStopped, call, stop_on_sigterm
from rlfleet.cluster.metrics import MetricsLog, plot
from rlfleet.cluster.runtime import connect, reserve
from rlfleet.config import ConfigError, RLFleetConfig, dump_config
from rlfleet.data import PromptStream
from rlfleet.dpo.data import PreferencePair, load_preference_dataset, tokenize_preferences

PLOT_KEYS = ("loss", "eval/rewards/accuracies", "eval/policy_accuracy")


def preflight_dpo(cfg: RLFleetConfig):
    """The tokenized training split and held-out split (None without ``data.eval_split``); raises
    :class:`ConfigError` listing every problem."""
    from rlfleet.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError([f"model.name_or_path: cannot load a tokenizer from {cfg.model.name_or_path!r}: {err}"])
    problems, splits = [], []
    for field, split in (("data.split", cfg.data.split), ("data.eval_split", cfg.data.eval_split)):
        if split is None:
            splits.append(None)
            continue
        try:
            raw = load_preference_dataset(cfg.data, split)
            splits.append(tokenize_preferences(raw, tokenizer, cfg.dpo.max_length, f"{field} {split!r}"))
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    return splits[0], splits[1]


def train_dpo(cfg: RLFleetConfig) -> dict:
    """Run ``rlfleet dpo``. Returns a small summary (last metrics, output paths)."""
    from rlfleet.dpo.actor import make_dpo_learner_actor

    # -- 1. validate and record -------------------------------------------------------------------------------
    train_ds, eval_ds = preflight_dpo(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = ckpt.latest_checkpoint(out) if cfg.checkpoint.resume else None
    if cfg.checkpoint.resume and resume_from is None:
        print(f"rlfleet dpo: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
    (out / "config.json").write_text(dump_config(cfg))

    # -- 2. cluster, learner, initial state ------------------------------------------------------------------
    where = connect(cfg.cluster)
    started_here = where.startswith("local")
    placement = reserve(cfg.cluster, num_generators=0)  # the learner's bundle only
    learner = make_dpo_learner_actor(cfg, name="rlfleet-dpo-learner", **placement.learner())
    stream = PromptStream(train_ds, seed=cfg.seed, shuffle=cfg.data.shuffle)
    eval_pairs = ray.put([PreferencePair.from_record(r) for r in eval_ds]) if eval_ds is not None else None
    step = 0
    if resume_from is not None:
        ckpt.verify(resume_from)
        call(learner.load.remote(str(resume_from / "learner")), cfg, "the DPO learner (loading a checkpoint)")
        state = json.loads((resume_from / "driver.json").read_text())
        stream.load_state_dict(state["stream"])
        step = int(state["step"])
        print(f"rlfleet dpo: resumed from {resume_from} at step {step}", flush=True)
    if call(learner.step.remote(), cfg, "the DPO learner (starting)") != step:
        raise RuntimeError(f"the DPO learner is at a different step than the driver's {step}")
    metrics_log = MetricsLog(out, resume_step=step if resume_from else None)
    print(f"rlfleet dpo: training on {where}: {len(train_ds)} pairs, output in {out}", flush=True)

    # -- 3. the loop ----------------------------------------------------------------------------------------
    max_steps, eval_steps = cfg.learner.max_steps, cfg.dpo.eval_steps
    last_record: dict = {}
    t0 = time.perf_counter()

    def evaluate() -> dict:
        if eval_pairs is None:
            return {}
        return call(learner.evaluate.remote(eval_pairs), cfg, "the DPO learner (evaluating)")

    def save(at_step: int) -> Path:
        staging = ckpt.staging_dir(out, at_step)
        call(learner.save.remote(str(staging / "learner")), cfg, "the DPO learner (saving)")
        (staging / "driver.json").write_text(json.dumps({"step": at_step, "stream": stream.state_dict()}, indent=2))
        return ckpt.commit(staging, at_step, cfg.checkpoint.keep_last)

    def finish_step(metrics: dict, with_eval: bool) -> None:
        nonlocal step, last_record
        step += 1
        if int(metrics["step"]) != step:
            raise RuntimeError(f"the DPO learner reports step {metrics['step']:g}, the driver expected {step}")
        record = {"step": step, **metrics, **(evaluate() if with_eval else {})}
        record["step"] = step
        metrics_log.write(record)
        last_record = record
        if step % cfg.logging.log_every == 0 or step == max_steps:
            rate = (step - start_step) / max(time.perf_counter() - t0, 1e-9)
            held_out = ""
            if "eval/rewards/accuracies" in record:
                held_out = (f"  held-out acc {record['eval/rewards/accuracies']:.3f} "
                            f"(policy {record['eval/policy_accuracy']:.3f})")
            print(f"rlfleet dpo: step {step}/{max_steps}  loss {record['loss']:.4f}  acc "
                  f"{record['rewards/accuracies']:.3f}  margin {record['rewards/margins']:.4f}{held_out}  "
                  f"{rate:.2f} steps/s", flush=True)

    start_step = step
    if step == 0 and eval_pairs is not None:  # the baseline the held-out accuracy is compared with
        last_record = {"step": 0, **evaluate()}
        metrics_log.write(last_record)
    future = None  # the train_step in flight
    with stop_on_sigterm():
        try:
            while step < max_steps:
                pairs = [PreferencePair.from_record(r) for r in stream.next_batch(cfg.dpo.batch_size)]
                future = learner.train_step.remote(pairs)
                metrics = call(future, cfg, "the DPO learner")
                future = None
                finish_step(metrics, with_eval=(step + 1) % eval_steps == 0 or step + 1 == max_steps)
                if step % cfg.checkpoint.save_steps == 0 and step < max_steps:
                    save(step)
        except RunStopped as stop:
            print(f"\nrlfleet dpo: stopping ({stop}); writing a final checkpoint", flush=True)

    # -- 4. final checkpoint, BEMA weights, plot, shutdown ---------------------------------------------------
    try:
        if future is not None:  # a step in flight changes the weights: count it before saving
            finish_step(call(future, cfg, "the DPO learner"), with_eval=False)
        final = save(step)
        bema_dir = None
        if cfg.dpo.bema is not None:
            bema_dir = out / "bema"
            call(learner.save_bema.remote(str(bema_dir)), cfg, "the DPO learner (saving the BEMA weights)")
        png = plot(metrics_log.read(), out / "dpo.png", keys=PLOT_KEYS) if cfg.logging.plot else None
        summary = {"step": step, "checkpoint": str(final), "metrics": str(metrics_log.path),
                   "bema": str(bema_dir) if bema_dir else None, "plot": str(png) if png else None,
                   "last": last_record}
        (out / "summary.json").write_text(json.dumps(summary, default=str, indent=2))
        print(f"rlfleet dpo: done at step {step}; checkpoint {final}", flush=True)
        return summary
    finally:
        ray.kill(learner, no_restart=True)
        placement.release()
        if started_here:
            ray.shutdown()
