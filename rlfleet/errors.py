"""Errors a user can act on. The CLI prints them as one message (exit 2), never as a traceback; and the one
error an actor's process does not print (:func:`quiet_kill_in_finalizers`)."""

import sys


class ClusterError(RuntimeError):
    """The cluster cannot run the job as configured (e.g. it lacks the requested resources)."""


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or incompatible."""


class OutputDirError(RuntimeError):
    """``output_dir`` cannot hold the run: it is a file, cannot be created or written, or another run holds its lock
    (:mod:`rlfleet.cluster.run_lock`)."""


class ActorLost(RuntimeError):
    """An actor the job cannot run without died: the job restarts its actors from the latest checkpoint."""


class RunFailed(RuntimeError):
    """A run that had to stop for a reason the user can act on (reward functions failing, actors past their restarts,
    no progress within the timeout). The CLI prints it as one message (exit 3); ``--debug`` keeps the traceback."""


class StartRefused(RunFailed):
    """An actor's ``__init__`` refused its config (a ValueError): starting it again would refuse it again, so the
    job stops instead of recovering."""


def quiet_kill_in_finalizers() -> None:
    """In an actor's process: a kill's SIGTERM that lands inside a finalizer (Ray's handler raises SystemExit there,
    e.g. in an ``ActorHandle.__del__`` run as the actor's last call releases its arguments) is not printed. Python
    ignores an exception raised in a finalizer anyway; its default hook would print the traceback, which Ray streams
    to the job's console as the run ends. Every other unraisable exception is printed as before."""
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    sys.unraisablehook = hook
