"""``rlfleet dpo``: DPO with BEMA reference updates, the program that ``ray job submit`` runs.

The job lifecycle (connect, restore, stop signals, recovery from a lost learner, final checkpoint) is
:func:`rlfleet.cluster.lifecycle.run_job`'s, shared with ``rlfleet train``; this module supplies the rest:
1. validate what can be checked without actors (tokenizer, preference data, tokenized lengths), write the resolved
   ``config.json``;
2. :class:`DPOJob`: the learner (:class:`~rlfleet.cluster.learners.LearnerGroup` of
   :class:`~rlfleet.learner.actor.LearnerActor`, the DPO objective) in a placement group of its own, restored from
   the latest checkpoint when resuming (or recovering);
3. the loop: ``dpo.batch_size`` pairs per step from a seeded, checkpointed stream over the training split; one line
   of ``metrics.jsonl`` per step (loss, rewards chosen / rejected, margins, accuracies, BEMA events), held-out
   metrics (``eval/*``) at step 0 and every ``dpo.eval_steps``; a checkpoint every ``checkpoint.save_steps``;
4. a final checkpoint, the BEMA weights in Hugging Face format under ``output_dir/bema`` (TRL's place), the plot,
   ``summary.json`` and a clean shutdown (also on Ctrl-C / SIGTERM / ``ray job stop``).

A checkpoint ``checkpoints/step-N/`` holds ``policy/`` (HF format), ``learner/`` (optimizer, scheduler, reference model,
BEMA state: :mod:`rlfleet.learner.trainee`'s layout) and ``driver.json`` (step, stream cursor).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.learners import LearnerGroup
from rlfleet.cluster.lifecycle import RunStopped, call, run_job
from rlfleet.cluster.metrics import StepOutputs, dpo_series, plot
from rlfleet.cluster.preflight import preflight_dpo
from rlfleet.cluster.run_lock import hold_output_dir
from rlfleet.cluster.runtime import learner_bundles, reserve
from rlfleet.config import RLFleetConfig, dump_config
from rlfleet.data import PromptStream
from rlfleet.dpo.data import PreferencePair

PLOT_KEYS = ("loss", "eval/rewards/accuracies", "eval/policy_accuracy")


def train_dpo(cfg: RLFleetConfig) -> dict:
    """Run ``rlfleet dpo``. Returns a small summary (last metrics, output paths). The run holds ``output_dir``'s
    lock (:mod:`~rlfleet.cluster.run_lock`) from before its checks to its end."""
    with hold_output_dir(cfg.output_dir, DPOJob.command):
        train_ds, eval_ds = preflight_dpo(cfg)
        (Path(cfg.output_dir) / "config.json").write_text(dump_config(cfg))
        return run_job(cfg, lambda recoveries, control: DPOJob(cfg, train_ds, eval_ds, control, recoveries),
                       generators_to_start=0, with_reference=True, dpo=True)


class DPOJob:
    """One life of the DPO learner actor: start (or restore), the loop, the final checkpoint and BEMA weights."""

    label = command = "rlfleet dpo"
    phase = "starting the DPO learner"

    def __init__(self, cfg: RLFleetConfig, train_ds, eval_ds, control, recoveries: int = 0):
        self.cfg, self.train_ds, self.eval_ds, self.recoveries = cfg, train_ds, eval_ds, recoveries
        self.control = control
        self.out = Path(cfg.output_dir)
        self.learner = self.placement = self.future = self.outputs = None  # future: the train_step in flight

    def start(self, resume_from: Path | None) -> None:
        from rlfleet.dpo.learner import dpo_learner

        cfg, t = self.cfg, self.cfg.cluster.timeout_s
        self.placement = reserve(learner_bundles(cfg.cluster), "rlfleet-dpo-learner", timeout_s=min(t, 120.0))
        self.learner = LearnerGroup(cfg, dpo_learner, None, "rlfleet-dpo-learner", self.placement)
        self.stream = PromptStream(self.train_ds, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.eval_pairs = None
        if self.eval_ds is not None:
            self.eval_pairs = ray.put([PreferencePair.from_record(r) for r in self.eval_ds])
        self.step = 0
        if resume_from is not None:
            ckpt.verify(resume_from, lora=self.cfg.model.lora is not None)
            self.learner.run("load", str(resume_from), what="the DPO learner (loading a checkpoint)")
            state = json.loads((resume_from / "driver.json").read_text())
            self.stream.load_state_dict(state["stream"])
            self.step = int(state["step"])
            print(f"rlfleet dpo: resumed from {resume_from} at step {self.step}", flush=True)
        if self.learner.run("step", what="the DPO learner (starting)") != self.step:
            raise RuntimeError(f"the DPO learner is at a different step than the driver's {self.step}")
        self.outputs = StepOutputs(cfg, dpo_series(self.eval_pairs is not None), self.step if resume_from else None)
        self.last_record: dict = {}
        self.start_step, self.t0 = self.step, time.perf_counter()
        self.control_future = self.control.next_request.remote(0)  # a stop request (rlfleet-control)
        print(f"rlfleet dpo: {len(self.train_ds)} training pairs", flush=True)
        if self.step == 0 and self.eval_pairs is not None:  # the baseline the held-out accuracy is compared with
            self.last_record = {"step": 0, **self.evaluate(), "faults/recoveries": self.recoveries}
            self.outputs.write(self.last_record)

    def evaluate(self) -> dict:
        if self.eval_pairs is None:
            return {}
        return self.learner.run("evaluate", self.eval_pairs, what="the DPO learner (evaluating)")

    def loop(self) -> None:
        cfg, max_steps = self.cfg, self.cfg.learner.max_steps
        while self.step < max_steps:
            pairs = [PreferencePair.from_record(r) for r in self.stream.next_batch(cfg.dpo.batch_size)]
            self.future = self.learner.call("train", pairs)
            metrics = self.learner.get(self.future, "the DPO learner")
            self.future = None
            self.finish_step(metrics, with_eval=(self.step + 1) % cfg.dpo.eval_steps == 0
                             or self.step + 1 == max_steps)
            if self.step % cfg.checkpoint.save_steps == 0 and self.step < max_steps:
                self.save()
            if ray.wait([self.control_future], timeout=0)[0]:
                _, request = call(self.control_future, cfg.cluster.timeout_s, "the rlfleet-control actor")
                if request.get("stop"):
                    raise RunStopped("stop requested through rlfleet-control")

    def finish_step(self, metrics: dict, with_eval: bool) -> None:
        max_steps = self.cfg.learner.max_steps
        self.step += 1
        if int(metrics["step"]) != self.step:
            raise RuntimeError(f"the DPO learner reports step {metrics['step']:g}, the driver expected {self.step}")
        record = {**metrics, **(self.evaluate() if with_eval else {}), "step": self.step,
                  "faults/recoveries": self.recoveries}
        self.outputs.write(record)
        self.last_record = record
        if self.step % self.cfg.logging.log_every == 0 or self.step == max_steps:
            rate = (self.step - self.start_step) / max(time.perf_counter() - self.t0, 1e-9)
            held_out = ""
            if "eval/rewards/accuracies" in record:
                prompts = "train-prompt" if self.cfg.data.eval_on_train else "held-out"  # data.eval_on_train
                held_out = (f"  {prompts} acc {record['eval/rewards/accuracies']:.3f} "
                            f"(policy {record['eval/policy_accuracy']:.3f})")
            print(f"rlfleet dpo: step {self.step}/{max_steps}  loss {record['loss']:.4f}  acc "
                  f"{record['rewards/accuracies']:.3f}  margin {record['rewards/margins']:.4f}{held_out}  "
                  f"{rate:.2f} steps/s", flush=True)

    def settle(self) -> None:
        if self.future is not None:  # a step in flight changes the weights: count it before saving
            self.finish_step(self.learner.get(self.future, "the DPO learner"), with_eval=False)
            self.future = None

    def save(self) -> Path:
        staging = ckpt.staging_dir(self.out, self.step)
        self.learner.run("save", str(staging), what="the DPO learner (saving)")
        (staging / "driver.json").write_text(json.dumps({"step": self.step, "stream": self.stream.state_dict()},
                                                        indent=2))
        return ckpt.commit(staging, self.step, self.cfg.checkpoint.keep_last)

    def finish(self, final: Path) -> dict:
        cfg, out = self.cfg, self.out
        bema_dir = None
        if cfg.dpo.bema is not None:
            bema_dir = out / "bema"
            self.learner.run("save_bema", str(bema_dir), what="the DPO learner (saving the BEMA weights)")
        png = plot(self.outputs.log.read(), out / "dpo.png", keys=PLOT_KEYS) if cfg.logging.plot else None
        summary = {"step": self.step, "checkpoint": str(final), "metrics": str(self.outputs.log.path),
                   "bema": str(bema_dir) if bema_dir else None, "plot": str(png) if png else None,
                   "last": self.last_record}
        (out / "summary.json").write_text(json.dumps(summary, default=str, indent=2))
        print(f"rlfleet dpo: done at step {self.step}; checkpoint {final}", flush=True)
        return summary

    def teardown(self) -> None:
        if self.outputs is not None:
            self.outputs.close()
        if self.learner is not None:
            self.learner.kill()
        if self.placement is not None:
            self.placement.release()
