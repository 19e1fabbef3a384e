"""How weights travel from the learner to the generation actors: one small seam, one module per implementation.

Learner side: a :class:`WeightPublisher` turns the policy's state dict into a :class:`WeightHandle`, a small
picklable value that the driver passes on without looking inside. Generator side: a :class:`WeightReceiver` turns the
handle back into tensors and loads them into the engine. The driver and the actors' method signatures know only
``(handle, version)``; which implementation runs is chosen once, by ``cluster.weight_transport``.

Where transports behave differently, each declares it in its :class:`Capabilities` and callers ask the capability
(``handle.capabilities.lazy``), never the transport's name.

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
class Capabilities:
    """What a transport can do, for the callers that must know.

    - ``lazy``: a publication stays loadable after later ones (its bytes are kept while its handle lives), so a
      generator may keep older weights and load a newer version when it chooses, or load one twice (an evaluation of
      an earlier step). Without it, a publication is received once by every member, at publication.
    - ``membership``: a publication reaches a group of generators named when it is made (``connect``); a generator
      outside that group must wait for a publication that includes it. The engine then takes part in a
      weight-transfer group of vLLM's RL API.
    """

    lazy: bool
    membership: bool


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

    @property
    def capabilities(self) -> Capabilities:
        return capabilities(self.transport)


class WeightPublisher(Protocol):
    capabilities: Capabilities

    def connect(self, members: list[str]) -> None:
        """The generators the next publication must reach (keys ``<actor name>@<incarnation>``); nothing to do for a
        transport without ``membership``."""

    def publish(self, state: Mapping[str, Tensor], version: int) -> WeightHandle: ...

    def stats(self) -> dict[str, float]:
        """The transport's own figures for the step's record (``sync/*``)."""


class WeightLoader(Protocol):
    """What a receiver loads into: :class:`rlfleet.generation.engine.Engine` (or a stand-in)."""

    def update_weights(self, state_dict: Mapping[str, Tensor], version: int) -> None: ...


class WeightReceiver(Protocol):
    def fetch(self, handle: WeightHandle, timeout_s: float) -> None:
        """Bring the publication's bytes to this node ahead of :meth:`apply`; the engine is not touched, so it may
        run while the engine generates."""

    def apply(self, handle: WeightHandle, engine: WeightLoader) -> None: ...


CAPABILITIES = {"object_store": Capabilities(lazy=True, membership=False),
                "broadcast": Capabilities(lazy=False, membership=True)}
TRANSPORTS = tuple(CAPABILITIES)


def capabilities(name: str) -> Capabilities:
    """Transport ``name``'s :class:`Capabilities`."""
    if name not in CAPABILITIES:
        raise ValueError(f"cluster.weight_transport: {name!r} is not one of {TRANSPORTS}")
    return CAPABILITIES[name]


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
