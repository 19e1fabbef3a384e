"""The replay actor: a thin async Ray shell around :class:`~rlfleet.replay.buffer.ReplayBuffer`.

Generation actors ``add`` groups; the learner calls ``sample``, which waits (on an ``asyncio.Condition`` that every
``add`` notifies) until the buffer can form a full batch or ``timeout_s`` passes. All methods run on the actor's
event loop, one at a time between awaits, so the buffer needs no lock.
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray

from rlfleet.config import ReplayConfig
from rlfleet.replay.buffer import ReplayBuffer
from rlfleet.types import Group


class ReplayActor:
    def __init__(self, cfg: ReplayConfig, seed: int):
        self.buffer = ReplayBuffer(cfg, seed)
        self._changed = asyncio.Condition()  # notified when groups arrive or the state is replaced

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def add(self, groups: list[Group]) -> dict[str, float]:
        """Queue fresh groups, wake waiting samplers; returns the buffer's stats (the generator's ack)."""
        self.buffer.add(groups)
        await self._notify()
        return self.buffer.stats()

    async def sample(self, n: int, current_version: int, timeout_s: float) -> list[Group] | None:
        """A batch of ``n`` groups for a learner at ``current_version``; None if none formed within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with self._changed:
            while (batch := self.buffer.sample(n, current_version)) is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass  # one last try above, then None
            return batch

    async def stats(self) -> dict[str, float]:
        return self.buffer.stats()

    async def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        return self.buffer.state_dict()

    async def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.buffer.load_state_dict(arrays, meta)
        await self._notify()


def make_replay_actor(cfg: ReplayConfig, seed: int, name: str = "rlfleet-replay", **options):
    """Start the named replay actor. It needs no CPU of its own by default (``num_cpus=0``); ``options`` override."""
    return ray.remote(ReplayActor).options(**({"name": name, "num_cpus": 0} | options)).remote(cfg, seed)
