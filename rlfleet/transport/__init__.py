"""How weights travel from the learner to the generation actors: one small seam, one module per implementation.

Learner side: a :class:`WeightPublisher` turns the policy's state dict into a :class:`WeightHandle`, a small
picklable value that the driver passes on without looking inside. Generator side: a :class:`WeightReceiver` turns the
handle back into tensors and loads them into the engine. The driver and the actors' method signatures know only
``(handle, version)``; which implementation runs is chosen once, by ``cluster.weight_transport``.

Implementations:
- ``object_store`` (:mod:`rlfleet.transport.object_store`): the state dict packed into one host buffer, one
  ``ray.put``; generators on the same node read it zero-copy from shared memory.
- ``broadcast`` (:mod:`rlfleet.transport.broadcast`): one collective broadcast per publication to a group of the
  learner and the generators, through vLLM's RL weight-transfer API (gloo backend on CPU,
  :mod:`rlfleet.transport.gloo_backend`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor


@dataclass(frozen=True)
class WeightHandle:
    """What a publication leaves for the generators: the transport's name, the policy version, and a payload only
    that transport reads (for ``object_store``: an object ref, which Ray does not resolve inside a dataclass)."""

    transport: str
    version: int
    payload: Any
    members: frozenset[str] | None = None  # the generators the publication reached; None: any generator

    def reaches(self, generator: str) -> bool:
        return self.members is None or generator in self.members


class WeightPublisher(Protocol):
    def publish(self, state: Mapping[str, Tensor], version: int) -> WeightHandle: ...


class WeightLoader(Protocol):
    """What a receiver loads into: :class:`rlfleet.generation.engine.Engine` (or a stand-in)."""

    def update_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None: ...


class WeightReceiver(Protocol):
    def fetch(self, handle: WeightHandle, timeout_s: float) -> None:
        """Bring the publication's bytes to this node ahead of :meth:`apply`; the engine is not touched, so it may
        run while the engine generates."""

    def apply(self, handle: WeightHandle, engine: WeightLoader) -> None: ...


TRANSPORTS = ("object_store", "broadcast")


def make_publisher(name: str, dtype, timeout_s: float = 600.0) -> WeightPublisher:
    """The learner side of transport ``name``; ``dtype`` is the engines' compute dtype."""
    if name == "object_store":
        from rlfleet.transport.object_store import ObjectStorePublisher

        return ObjectStorePublisher(dtype)
    if name == "broadcast":
        from rlfleet.transport.broadcast import BroadcastPublisher

        return BroadcastPublisher(dtype, timeout_s)
    raise ValueError(f"cluster.weight_transport: {name!r} is not one of {TRANSPORTS}")


def make_receiver(name: str) -> WeightReceiver:
    """The generator side of transport ``name``."""
    if name == "object_store":
        from rlfleet.transport.object_store import ObjectStoreReceiver

        return ObjectStoreReceiver()
    if name == "broadcast":
        from rlfleet.transport.broadcast import BroadcastReceiver

        return BroadcastReceiver()
    raise ValueError(f"cluster.weight_transport: {name!r} is not one of {TRANSPORTS}")
