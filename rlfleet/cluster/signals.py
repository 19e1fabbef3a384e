"""Stop requests and waits on actors: the driver's blocking calls, each with a timeout, a stop check and an error
that names the actor. Used by the job lifecycle, the generator pool and placement."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

import ray

from rlfleet.errors import ActorLost, RunFailed, StartRefused  # noqa: F401 - raised here, caught by the lifecycle


class RunStopped(Exception):
    """SIGTERM (``ray job stop``), Ctrl-C or a stop request: stop after a final checkpoint."""


STOP_POLL_S = 0.5  # how soon a wait inside stop_on_sigterm notices a stop request

_stop_requested = threading.Event()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _on_signal(signum, frame) -> None:
    _stop_requested.set()


def take_back_signals() -> None:
    """Within :func:`stop_on_sigterm`, after ``ray.init``: Ray installs its own SIGTERM handler when it connects (it
    logs the signal and ends the process, so ``ray job stop`` would leave no checkpoint); this puts ours back."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _on_signal:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _on_signal)


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
    _stop_requested.clear()
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_requested.clear()


def clear_stop() -> None:
    """Forget a stop request that has been acted on (the run is writing its final checkpoint); a new one still
    counts."""
    _stop_requested.clear()


OUT_OF_MEMORY = ("its node ran out of memory. Lower the memory the job needs on that node (fewer generators per "
                 "node, generation.kv_cache_space_gib, a smaller micro-batch, learner.logprob_chunk_tokens) or give "
                 "it more")


def check_stop() -> None:
    if _stop_requested.is_set():
        raise RunStopped("stop requested (SIGTERM or SIGINT)")


def call(ref, timeout_s: float, what: str):
    """ray.get with a timeout and an error that names the actor; inside :func:`stop_on_sigterm` it raises
    :class:`RunStopped` soon after a stop request, :class:`ActorLost` when the actor died (the job recovers), and
    :class:`StartRefused` (a :class:`RunFailed`) when its ``__init__`` refused its config with a ValueError (a
    recovery would refuse it again), naming what was raised."""
    deadline = time.monotonic() + timeout_s
    while True:
        check_stop()
        try:
            return ray.get(ref, timeout=min(STOP_POLL_S, max(deadline - time.monotonic(), 0.0)))
        except ray.exceptions.GetTimeoutError:
            if time.monotonic() >= deadline:
                raise RunFailed(f"{what} did not answer within cluster.timeout_s={timeout_s:g} s") from None
        except ray.exceptions.RayActorError as err:
            if err.actor_init_failed and raised_in(err).startswith("ValueError"):
                # its __init__ refused its config: a recovery would refuse it again (other errors in __init__, a
                # rendezvous that lost a rank, may not recur), unless a stop request reached it as it started
                check_stop()
                raise StartRefused(f"{what} failed to start: {raised_in(err)}") from err
            raise ActorLost(f"{what} died: {err}") from err
        except ray.exceptions.OutOfMemoryError as err:  # Ray's memory monitor killed the actor's process
            raise ActorLost(f"{what} was killed by Ray's memory monitor: {OUT_OF_MEMORY}") from err


def raised_in(err: Exception) -> str:
    """The exception an actor's creation task raised, as its traceback's last line (``ValueError: ...``), without
    the traceback Ray's error carries."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def wait_any(refs: list[ray.ObjectRef], timeout_s: float) -> list[ray.ObjectRef]:
    """The refs of ``refs`` that are ready, as soon as one is (empty after ``timeout_s``); inside
    :func:`stop_on_sigterm` it raises :class:`RunStopped` soon after a stop request."""
    deadline = time.monotonic() + timeout_s
    while True:
        check_stop()
        ready, _ = ray.wait(refs, num_returns=1, timeout=min(STOP_POLL_S, max(deadline - time.monotonic(), 0.0)))
        if ready or time.monotonic() >= deadline:
            return ready
