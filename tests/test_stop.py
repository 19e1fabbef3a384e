"""Stop requests (``ray job stop``'s SIGTERM, Ctrl-C's SIGINT) reaching a driver blocked in a Ray call."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from rlfleet.cluster.lifecycle import RunStopped, call, stop_on_sigterm, wait_any

pytestmark = pytest.mark.ray


def never_ending(ray):
    """The ref of a task that never finishes (cancel it when done)."""

    @ray.remote(num_cpus=0)
    def never() -> None:
        threading.Event().wait()

    return never.remote()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("blocking", ["wait_any", "call"])
def test_a_signal_during_a_blocking_ray_call_raises_run_stopped(ray_cluster, sig, blocking):
    """The signal arrives while the main thread is blocked in ray.wait / ray.get on a task that never finishes; the
    blocking helper raises RunStopped (not Ray's SystemError, not a timeout after 60 s), and leaving the block
    restores the previous handlers.

    Before: the handler raised RunStopped itself; landing inside Ray's Cython wait, it came out as ``SystemError:
    <cyfunction CoreWorker.wait> returned a result with an exception set`` and the job died without its checkpoint.
    """
    ray = ray_cluster
    ref = never_ending(ray)
    block = {"wait_any": lambda: wait_any([ref], 60.0), "call": lambda: call(ref, 60.0, "a task that never ends")}
    before = signal.getsignal(sig)
    try:
        with stop_on_sigterm():
            timer = threading.Timer(0.5, os.kill, (os.getpid(), sig))  # from another thread, into the blocked call
            timer.start()
            with pytest.raises(RunStopped):
                block[blocking]()
            timer.join()
        assert signal.getsignal(sig) is before
    finally:
        ray.cancel(ref, force=True)


def test_without_a_stop_request_wait_any_returns_ready_refs_and_times_out_empty(ray_cluster):
    ray = ray_cluster
    done = ray.put(1)
    pending = never_ending(ray)
    try:
        with stop_on_sigterm():
            assert wait_any([pending, done], 5.0) == [done]
            assert wait_any([pending], 1.2) == []
    finally:
        ray.cancel(pending, force=True)


def test_an_actor_killed_for_memory_is_an_actor_lost_that_names_the_cause(ray_cluster):
    """Ray reports a process its memory monitor killed with OutOfMemoryError, not an actor error: call() turns it
    into ActorLost (the job recovers from its checkpoint) with a message that says memory, not a raw traceback. The
    error is raised here by the actor itself, which reaches the caller with the same type."""
    from rlfleet.cluster.lifecycle import ActorLost

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Starved:
        def work(self):
            raise ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")

    actor = Starved.remote()
    with stop_on_sigterm(), pytest.raises(ActorLost) as err:
        call(actor.work.remote(), 60, "the learner")
    assert str(err.value).startswith("the learner was killed by Ray's memory monitor: its node ran out of memory")
    ray.kill(actor)


def test_an_actor_that_refuses_its_config_fails_the_run_naming_the_error_without_its_traceback(ray_cluster):
    """A ValueError in an actor's __init__ (a learner refusing its config) would be raised again by every recovery:
    call() turns it into RunFailed with the exception's own line, not ActorLost and Ray's traceback. Another error
    in __init__ (a rendezvous that lost a rank) and an actor that started and then died are still ActorLost (the
    job recovers)."""
    from rlfleet.cluster.lifecycle import ActorLost, RunFailed
    from rlfleet.errors import StartRefused

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Refusing:
        def __init__(self, refuse: bool, error: type = ValueError):
            if refuse:
                raise error("learner.pack_sequences: the model does not keep packed sequences apart")

        def work(self):
            return os.getpid()

    refusing = Refusing.remote(True)
    with stop_on_sigterm(), pytest.raises(StartRefused) as err:
        call(refusing.work.remote(), 60, "the learner")
    assert isinstance(err.value, RunFailed)  # the CLI's one-message exit
    assert str(err.value) == ("the learner failed to start: ValueError: learner.pack_sequences: the model does not "
                              "keep packed sequences apart")
    lost_rank = Refusing.remote(True, RuntimeError)
    with stop_on_sigterm(), pytest.raises(ActorLost, match="^the learner died: "):
        call(lost_rank.work.remote(), 60, "the learner")
    started = Refusing.remote(False)
    with stop_on_sigterm():
        pid = call(started.work.remote(), 60, "the learner")
    os.kill(pid, signal.SIGKILL)
    with stop_on_sigterm(), pytest.raises(ActorLost, match="^the learner died: "):
        call(started.work.remote(), 60, "the learner")


def test_take_back_signals_restores_the_stop_handler_that_ray_init_replaced():
    """ray.init installs its own SIGTERM handler (it logs the signal and ends the process: ``ray job stop`` then left
    no checkpoint). Within stop_on_sigterm, take_back_signals puts the stop handler back; outside it, nothing
    changes."""
    from rlfleet.cluster.lifecycle import take_back_signals

    with stop_on_sigterm():
        ours = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init does, in effect
        take_back_signals()
        assert signal.getsignal(signal.SIGTERM) is ours
    before = signal.getsignal(signal.SIGTERM)
    take_back_signals()
    assert signal.getsignal(signal.SIGTERM) is before
