"""Operating a running job: the ``rlfleet-control`` actor in the job's namespace, and ``rlfleet scale``.

The driver starts :class:`FleetControl` (named ``rlfleet-control``, no resources) and keeps one
``next_request`` call on it in flight: the call returns when an operator asks for something, so the driver reacts
without polling. ``rlfleet scale --address ADDR --job NAME --generators N`` connects the way ``ray job submit``
does (the Ray address; the job's name gives its namespace ``rlfleet-NAME``), asks the actor, and prints the fleet
as the driver last reported it.
"""

from __future__ import annotations

import asyncio
import logging

import ray

CONTROL_NAME = "rlfleet-control"


class FleetControl:
    """Requests from operators, and the fleet's last reported status. Async: calls wait without a thread."""

    def __init__(self):
        self.seq = 0  # bumped by every request
        self.request: dict = {}
        self.status: dict = {}
        self.closed = False  # the job ended: waiting calls return, so none is left to be killed with the actor
        self.waiting = 0  # next_request calls waiting now
        self._changed = asyncio.Event()

    async def scale(self, generators: int) -> dict:
        if generators < 1:
            raise ValueError(f"--generators {generators}: a job needs at least one generator")
        return await self._ask({"generators": int(generators)})

    async def stop(self) -> dict:
        """Stop the run after a final checkpoint, as SIGTERM does (``ray job stop`` for submitted jobs)."""
        return await self._ask({"stop": True})

    async def _ask(self, request: dict) -> dict:
        self.seq += 1
        self.request = {**self.request, **request}
        self._changed.set()
        return {"seq": self.seq, **self.status}

    async def next_request(self, seen: int) -> tuple[int, dict]:
        """The latest request once there is one newer than ``seen`` (or the job closed the actor): ``(seq,
        request)``."""
        self.waiting += 1
        try:
            while self.seq <= seen and not self.closed:
                self._changed.clear()
                await self._changed.wait()
        finally:
            self.waiting -= 1
        return self.seq, dict(self.request)

    async def close(self) -> None:
        """The job is ending: answer every waiting ``next_request`` before the actor is killed (a call killed in
        flight shows as a failed task on the Ray dashboard of a run that went well)."""
        self.closed = True
        self._changed.set()
        while self.waiting:
            await asyncio.sleep(0)

    async def report(self, status: dict) -> None:
        self.status = status

    async def get_status(self) -> dict:
        return dict(self.status)


def close_control(control: ray.actor.ActorHandle | None, timeout_s: float = 10.0) -> None:
    """End the control actor's waiting calls (see :meth:`FleetControl.close`); the caller kills it after."""
    if control is None:
        return
    try:
        ray.get(control.close.remote(), timeout=timeout_s)
    except Exception:  # deliberate: already gone, or the cluster is; killing it is all that is left
        pass


def start_control() -> ray.actor.ActorHandle:
    return ray.remote(FleetControl).options(name=CONTROL_NAME, num_cpus=0, max_concurrency=16).remote()


def scale(address: str | None, job: str, generators: int, timeout_s: float = 30.0) -> dict:
    """Ask the job ``job`` on the Ray cluster at ``address`` for ``generators`` generation actors; returns the
    fleet's last reported status. Raises ``ValueError`` naming the job when it is not running there."""
    from rlfleet.cluster.runtime import job_namespace

    ray.init(address=address or "auto", namespace=job_namespace(job), logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        try:
            control = ray.get_actor(CONTROL_NAME)
        except ValueError:
            raise ValueError(f"no running rlfleet job named {job!r} on this cluster (no {CONTROL_NAME} actor in "
                             f"namespace {job_namespace(job)}); the name is cluster.job_name or the last part "
                             "of output_dir") from None
        return ray.get(control.scale.remote(generators), timeout=timeout_s)
    finally:
        ray.shutdown()
