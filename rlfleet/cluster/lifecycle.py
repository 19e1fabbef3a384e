"""One job lifecycle for ``rlfleet train`` and ``rlfleet dpo``: connect, place, restore, loop, stop, recover, save.

A command supplies a :class:`Job` (its actors, its step, its state); :func:`run_job` does the rest the same way
for both:

1. check that the job can fit: this machine's cores and memory when rlfleet starts its own Ray cluster (before
   Ray starts), the cluster's resources and memory otherwise (before any actor); connect in the job's namespace;
2. ``job.start(checkpoint)``: start the actors, restore the latest checkpoint when resuming;
3. ``job.loop()`` until ``learner.max_steps``, inside :func:`stop_on_sigterm`: Ctrl-C, SIGTERM (``ray job stop``)
   and a stop request to the job's ``rlfleet-control`` actor (:mod:`rlfleet.cluster.control`) end the loop at the
   next wait;
4. ``job.settle()`` (a step in flight changes the weights: count it), ``job.save()`` (the final checkpoint),
   ``job.finish()`` (plot, summary), and ``job.teardown()`` on every path;
5. a stop before the first step ends the run with one line naming what was interrupted, no checkpoint;
6. if an actor the job cannot run without dies (:class:`ActorLost`: the learner, the replay actor), the job is
   started again from the latest checkpoint, up to ``cluster.max_restarts`` times (``faults/recoveries``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import ray

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.control import close_control, start_control
from rlfleet.cluster.memory import job_estimate, ways_out
from rlfleet.cluster.metrics import logger_problems
from rlfleet.cluster.runtime import (connect, job_name, job_namespace, preflight_cluster, preflight_local,
                                     starts_local_cluster)
from rlfleet.cluster.signals import (ActorLost, RunStopped, call, check_stop, clear_stop,  # noqa: F401
                                    stop_on_sigterm, take_back_signals, wait_any)
from rlfleet.config import ConfigError, RLFleetConfig
from rlfleet.errors import RunFailed


class Job(Protocol):
    label: str  # prefix of the job's messages: "rlfleet" or "rlfleet dpo"
    command: str  # the command that runs it: "rlfleet train" or "rlfleet dpo"
    phase: str  # what start() is doing, for the message of a stop during start-up

    def start(self, resume_from: Path | None) -> None: ...

    def loop(self) -> None: ...

    def settle(self) -> None: ...

    def save(self) -> Path: ...

    def finish(self, final: Path) -> dict: ...

    def teardown(self) -> None: ...


def run_job(cfg: RLFleetConfig, make_job: Callable[[int, ray.actor.ActorHandle], Job],
            generators_to_start: int, with_reference: bool, dpo: bool = False) -> dict:
    """Run the job that ``make_job(recoveries, control)`` builds (a fresh one for every recovery; ``control`` is the
    job's ``rlfleet-control`` actor, which outlives recoveries); returns its summary.

    A stop (Ctrl-C, SIGTERM, ``ray job stop``, a stop request) at any moment ends the run cleanly: before the first
    step with one line naming what was interrupted (``summary["stopped"]``), afterwards with a final checkpoint; a
    second stop while that checkpoint is written keeps the latest complete one. Actors are killed and a local Ray
    cluster shut down on every path.
    """
    out = Path(cfg.output_dir)
    if problems := logger_problems(cfg.logging):
        raise ConfigError(problems)
    if cfg.checkpoint.resume and (latest := ckpt.latest_checkpoint(out)) is not None:
        # a corrupt or incompatible checkpoint (another learner group size too) is refused before Ray starts
        ckpt.verify(latest, cfg.cluster.learner_workers, lora=cfg.model.lora is not None)
    memory = job_estimate(cfg, with_reference, dpo)
    options = functools.partial(ways_out, cfg, with_reference, dpo)  # what would fit, for a refusal
    if starts_local_cluster(cfg.cluster):
        preflight_local(cfg.cluster, generators_to_start, memory, options)  # before Ray starts any process
    resume, recoveries = cfg.checkpoint.resume, 0
    label, phase, where, control, job = "rlfleet", "connecting to Ray", "", None, None
    with stop_on_sigterm():
        try:
            where = connect(cfg.cluster, job_namespace(job_name(cfg)))
            take_back_signals()  # ray.init replaced our SIGTERM handler with its own
            check_stop()  # a signal that arrived while ray.init ran
            phase = "checking the cluster's resources"
            preflight_cluster(cfg.cluster, generators_to_start, memory, options)
            control = start_control()
            while True:
                job = make_job(recoveries, control)
                label = job.label
                if resume and recoveries == 0 and ckpt.latest_checkpoint(out) is None:
                    print(f"{label}: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
                try:
                    started = False
                    try:
                        job.start(ckpt.latest_checkpoint(out) if resume else None)
                        started = True
                        print(f"{label}: training on {where}, output in {out}", flush=True)
                        job.loop()
                    except RunStopped as stop:
                        if not started:
                            phase = getattr(job, "phase", "starting the actors")
                            raise
                        print(f"\n{label}: stopping ({stop}); writing a final checkpoint", flush=True)
                        clear_stop()
                        phase = "writing the final checkpoint"
                    job.settle()
                    return job.finish(job.save())
                except ActorLost as err:
                    recoveries += 1
                    if recoveries > cfg.cluster.max_restarts:
                        raise RunFailed(
                            f"{err}; gave up after {cfg.cluster.max_restarts} recoveries (cluster.max_restarts). "
                            f"Resume with: {job.command} <job.yaml> output_dir={out} --resume") \
                            from err
                    print(f"{label}: {err}; recovery {recoveries}: restarting the actors from the latest "
                          "checkpoint", flush=True)
                    resume = True
                finally:
                    job.teardown()
        except RunStopped:
            kept = ckpt.latest_checkpoint(out)
            tail = f"the latest complete checkpoint is {kept}" if kept else "nothing was trained, nothing to save"
            print(f"\n{label}: stopped while {phase}; {tail}", flush=True)
            return {"step": None, "stopped": phase, "checkpoint": str(kept) if kept else None}
        finally:
            close_control(control)
            kill(control)
            if where.startswith("local"):
                ray.shutdown()


def kill(*handles) -> None:
    """Kill actors for good, ignoring those already gone."""
    for handle in handles:
        if handle is None:
            continue
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            pass
