"""Errors a user can act on. The CLI prints them as one message (exit 2), never as a traceback."""


class ClusterError(RuntimeError):
    """The cluster cannot run the job as configured (e.g. it lacks the requested resources)."""


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or incompatible."""
