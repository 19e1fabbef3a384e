"""Weights within one process (``cluster.colocate``): the learner's tensors loaded into the engine beside it.

The colocated actor (:mod:`rlfleet.cluster.colocated`) holds the learner and the engine. A publication is one load
of the learner's state dict into the engine, made by the publisher itself before it returns the handle: no packed
buffer, no object-store object, no collective, and the engine serves the new version before the driver hears of it.
The handle carries the version alone, so the receiver has nothing to load: it checks that the engine already serves
that version (a publication is never skipped, so it always does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from rlfleet.transport import CAPABILITIES, FULL, Contents, WeightHandle, WeightLoader

NAME = "colocated"


class ColocatedPublisher:
    """``load(state, version, contents)`` puts the tensors into the engine (between requests, or between two engine
    steps on a continuous engine) and returns once they are loaded; the learner may change its tensors after that."""

    capabilities = CAPABILITIES[NAME]

    def __init__(self, load: Callable[[Mapping[str, Tensor], int, Contents], None], contents: Contents = FULL):
        self.load, self.contents = load, contents

    def connect(self, members: list[str]) -> None:
        """Nothing: the one engine is in this process."""

    def publish(self, state: Mapping[str, Tensor], version: int) -> WeightHandle:
        self.load(state, int(version), self.contents)
        return WeightHandle(NAME, int(version), None, contents=self.contents)

    def stats(self) -> dict[str, float]:
        return {}


class ColocatedReceiver:
    """The engine loaded at publication: :meth:`apply` only checks that it serves the handle's version or newer."""

    def fetch(self, handle: WeightHandle, timeout_s: float) -> None:
        """Nothing to bring: the tensors never leave the process."""

    def apply(self, handle: WeightHandle, engine: WeightLoader) -> int:
        if engine.version < handle.version:
            raise RuntimeError(f"colocated weights: the engine serves version {engine.version}, older than the "
                               f"publication's {handle.version}, which loads at publication; this is a bug")
        return engine.version

    def join(self, init_info: dict, engine) -> None:
        raise RuntimeError(f"the {NAME!r} transport has no weight-transfer group to join")

    def receive(self, update_info: dict, version: int, engine) -> None:
        raise RuntimeError(f"the {NAME!r} transport pushes no rounds: the engine loads at publication")
