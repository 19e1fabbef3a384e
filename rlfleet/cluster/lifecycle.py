"""One job lifecycle for ``rlfleet train`` and ``rlfleet dpo``: connect, place, restore, loop, stop, recover, save.

A command supplies a :class:`Job` (its actors, its step, its state); :func:`run_job` does the rest the same way
for both:

1. connect to Ray in the job's namespace and check that the cluster can ever hold the job (before any actor);
2. ``job.start(checkpoint)``: start the actors, restore the latest checkpoint when resuming;
3. ``job.loop()`` until ``learner.max_steps``, inside :func:`stop_on_sigterm`: Ctrl-C, SIGTERM (``ray job stop``)
   and a stop request to the job's ``rlfleet-control`` actor (:mod:`rlfleet.cluster.control`) end the loop at the
   next wait;
4. ``job.settle()`` (a step in flight changes the weights: count it), ``job.save()`` (the final checkpoint),
   ``job.finish()`` (plot, summary), and ``job.teardown()`` on every path;
5. if an actor the job cannot run without dies (:class:`ActorLost`: the learner, the replay actor), the job is
   started again from the latest checkpoint, up to ``cluster.max_restarts`` times (``faults/recoveries``).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import ray

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.cluster.control import start_control
from rlfleet.cluster.runtime import connect, job_name, job_namespace, preflight_cluster
from rlfleet.config import RLFleetConfig


class RunStopped(Exception):
    """SIGTERM (``ray job stop``), Ctrl-C or a stop request: stop after a final checkpoint."""


class ActorLost(RuntimeError):
    """An actor the job cannot run without died: the job restarts its actors from the latest checkpoint."""


STOP_POLL_S = 0.5  # how soon a wait inside stop_on_sigterm notices a stop request

_stop_requested = threading.Event()


@contextmanager
def stop_on_sigterm():
    """Within the block, SIGTERM (``ray job stop``) and SIGINT (Ctrl-C) request a stop: the next :func:`call` or
    :func:`wait_any`, within ``STOP_POLL_S``, raises :class:`RunStopped`, so the run can write a final checkpoint.

    The handler only sets a flag. Raising from it, as Python's default SIGINT handler does, lands the exception in the
    middle of Ray's Cython ``ray.wait`` / ``ray.get``, which then fails with ``SystemError: ... returned a result
    with an exception set`` instead of the exception, and the run dies without its checkpoint. Signals reach the main
    thread only: elsewhere (a run started from a thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        _stop_requested.set()

    _stop_requested.clear()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_requested.clear()


def _check_stop() -> None:
    if _stop_requested.is_set():
        raise RunStopped("stop requested (SIGTERM or SIGINT)")


def call(ref, timeout_s: float, what: str):
    """ray.get with a timeout and an error that names the actor; inside :func:`stop_on_sigterm` it raises
    :class:`RunStopped` soon after a stop request, and :class:`ActorLost` when the actor died."""
    deadline = time.monotonic() + timeout_s
    while True:
        _check_stop()
        try:
            return ray.get(ref, timeout=min(STOP_POLL_S, max(deadline - time.monotonic(), 0.0)))
        except ray.exceptions.GetTimeoutError:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{what} did not answer within cluster.timeout_s={timeout_s:g} s") from None
        except ray.exceptions.RayActorError as err:
            raise ActorLost(f"{what} died: {err}") from err


def wait_any(refs: list[ray.ObjectRef], timeout_s: float) -> list[ray.ObjectRef]:
    """The refs of ``refs`` that are ready, as soon as one is (empty after ``timeout_s``); inside
    :func:`stop_on_sigterm` it raises :class:`RunStopped` soon after a stop request."""
    deadline = time.monotonic() + timeout_s
    while True:
        _check_stop()
        ready, _ = ray.wait(refs, num_returns=1, timeout=min(STOP_POLL_S, max(deadline - time.monotonic(), 0.0)))
        if ready or time.monotonic() >= deadline:
            return ready


class Job(Protocol):
    label: str  # prefix of the job's messages: "rlfleet" or "rlfleet dpo"

    def start(self, resume_from: Path | None) -> None: ...

    def loop(self) -> None: ...

    def settle(self) -> None: ...

    def save(self) -> Path: ...

    def finish(self, final: Path) -> dict: ...

    def teardown(self) -> None: ...


def run_job(cfg: RLFleetConfig, make_job: Callable[[int, ray.actor.ActorHandle], Job],
            generators_to_start: int) -> dict:
    """Run the job that ``make_job(recoveries, control)`` builds (a fresh one for every recovery; ``control`` is the
    job's ``rlfleet-control`` actor, which outlives recoveries); returns its summary."""
    out = Path(cfg.output_dir)
    if cfg.checkpoint.resume and (latest := ckpt.latest_checkpoint(out)) is not None:
        ckpt.verify(latest)  # a corrupt or incompatible checkpoint is refused before Ray or any actor starts
    where = connect(cfg.cluster, job_namespace(job_name(cfg)))
    resume = cfg.checkpoint.resume
    recoveries = 0
    control = None
    try:
        preflight_cluster(cfg.cluster, generators_to_start)
        control = start_control()
        while True:
            job = make_job(recoveries, control)
            if resume and recoveries == 0 and ckpt.latest_checkpoint(out) is None:
                print(f"{job.label}: no checkpoint in {out / 'checkpoints'}; starting from scratch", flush=True)
            try:
                started = False
                with stop_on_sigterm():
                    try:
                        job.start(ckpt.latest_checkpoint(out) if resume else None)
                        started = True
                        print(f"{job.label}: training on {where}, output in {out}", flush=True)
                        job.loop()
                    except RunStopped as stop:
                        print(f"\n{job.label}: stopping ({stop}); "
                              + ("writing a final checkpoint" if started else "nothing trained yet"), flush=True)
                        if not started:
                            return {"step": None, "stopped": "while starting"}
                job.settle()
                return job.finish(job.save())
            except ActorLost as err:
                recoveries += 1
                if recoveries > cfg.cluster.max_restarts:
                    raise RuntimeError(
                        f"{err}; gave up after {cfg.cluster.max_restarts} recoveries (cluster.max_restarts). Resume "
                        f"with: {job.label} <job.yaml> --resume (output_dir={out})") from err
                print(f"{job.label}: {err}; recovery {recoveries}: restarting the actors from the latest checkpoint",
                      flush=True)
                resume = True
            finally:
                job.teardown()
    finally:
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
