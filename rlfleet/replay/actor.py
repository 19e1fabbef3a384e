"""The replay actor: a thin async Ray shell around :class:`~rlfleet.replay.buffer.ReplayBuffer`.

Generation actors ``add`` groups; the learner calls ``sample``, which waits (on an ``asyncio.Condition`` that every
``add`` notifies) until the buffer can form a full batch or ``timeout_s`` passes. All methods run on the actor's
event loop, one at a time between awaits, so the buffer needs no lock.

With ``replay.consume_order: request`` each ``add`` names its request's number and the driver ``skip`` s the numbers
of requests lost with their generator: groups enter the buffer in request order
(:class:`~rlfleet.replay.order.RequestOrder`). A checkpoint is taken with no request in flight, when nothing is
held, so the order is not part of the buffer's state: a restored job numbers its requests from 0 again.
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray

from rlfleet.config import ReplayConfig
from rlfleet.replay.buffer import ReplayBuffer
from rlfleet.replay.order import RequestOrder
from rlfleet.types import Group


class ReplayActor:
    def __init__(self, cfg: ReplayConfig, seed: int):
        self.buffer = ReplayBuffer(cfg, seed)
        self.order: RequestOrder[Group] = RequestOrder()
        self._changed = asyncio.Condition()  # notified when groups arrive or the state is replaced
        self.seq = 0  # calls that changed the buffer so far: orders the snapshots of stats() (``replay/seq``)
        self.delivering: dict[str, list[str]] = {}  # request key -> prompt ids of its groups, until forgotten
        self.fenced: set[str] = set()  # keys of requests lost with their generator: later groups are discarded
        self.fenced_groups = 0

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def add(self, groups: list[Group], seq: int | None = None, request: str | None = None
                  ) -> dict[str, float]:
        """Queue fresh groups (those of request ``seq``, in request order, when it is given), wake waiting samplers;
        returns the buffer's stats (the generator's ack).

        ``request``: the key of a request whose groups arrive in several calls (a continuous engine's, each group as
        it is made). The prompts it delivered are kept until the driver has its result (:meth:`forget`) or fences
        it (:meth:`fence`); a fenced request's groups are discarded (``replay/fenced_groups``: their prompts were
        issued again)."""
        if request in self.fenced:
            self.fenced_groups += len(groups)
            return await self.stats()
        if request is not None:
            self.delivering.setdefault(request, []).extend(g.prompt_id for g in groups)
        self.buffer.add(groups if seq is None else self.order.deliver(seq, groups))
        self.seq += 1
        await self._notify()
        return await self.stats()

    async def fence(self, requests: list[str]) -> dict[str, list[str]]:
        """Requests lost with their generator: the prompt ids of the groups each delivered (the driver re-issues the
        others); from now on their groups are discarded."""
        self.fenced.update(requests)
        return {request: self.delivering.pop(request, []) for request in requests}

    async def forget(self, requests: list[str]) -> None:
        """Requests whose results reached the driver: nothing will ask what they delivered."""
        for request in requests:
            self.delivering.pop(request, None)

    async def skip(self, seqs: list[int]) -> None:
        """Requests ``seqs`` were lost with their generator (their prompts are re-issued): stop waiting for them."""
        for seq in seqs:
            self.buffer.add(self.order.skip(seq))
        self.seq += 1
        await self._notify()

    async def sample(self, n: int, current_version: int, timeout_s: float) -> list[Group] | None:
        """A batch of ``n`` groups for a learner at ``current_version``; None if none formed within ``timeout_s``."""
        return (await self.sample_with_stats(n, current_version, timeout_s))[0]

    async def sample_with_stats(self, n: int, current_version: int, timeout_s: float
                                ) -> tuple[list[Group] | None, dict[str, float]]:
        """:meth:`sample`, and the stats as it left the buffer (the learner passes them on to the driver). A try
        that dropped groups and formed no batch returns at once: the driver's admission counts those groups as live
        until it hears of the drop, and generators it holds back send no acks to tell it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with self._changed:
            while True:
                dropped = self.buffer.dropped
                if (batch := self.buffer.sample(n, current_version)) is not None:
                    break
                self.seq += 1  # a failed try may drop stale groups
                remaining = deadline - loop.time()
                if remaining <= 0 or self.buffer.dropped > dropped:
                    return None, await self.stats()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass  # one last try above, then None
            self.seq += 1
            return batch, await self.stats()

    async def stats(self) -> dict[str, float]:
        """The buffer's counters and sizes, the request order's, and ``replay/seq``: the number of calls that changed
        them so far, which orders snapshots heard out of order (:class:`~rlfleet.cluster.admission.LiveGroups`)."""
        return self.buffer.stats() | {"replay/held": float(self.order.held),
                                      "replay/ignored_deliveries": float(self.order.ignored),
                                      "replay/fenced_groups": float(self.fenced_groups),
                                      "replay/seq": float(self.seq)}

    async def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        return self.buffer.state_dict()

    async def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.buffer.load_state_dict(arrays, meta)
        self.seq += 1
        await self._notify()


def make_replay_actor(cfg: ReplayConfig, seed: int, name: str = "rlfleet-replay", **options):
    """Start the named replay actor. It needs no CPU of its own by default (``num_cpus=0``); ``options`` override."""
    return ray.remote(ReplayActor).options(**({"name": name, "num_cpus": 0} | options)).remote(cfg, seed)
