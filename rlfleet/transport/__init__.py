"""How weights travel from the learner to the generation actors: one small seam, one module per implementation.

Learner side: a :class:`WeightPublisher` turns the policy's state dict into a :class:`WeightHandle`, a small
picklable value that the driver passes on without looking inside. Generator side: a :class:`WeightReceiver` turns the
handle back into tensors and loads them into the engine, through what :class:`WeightLoader` (and, for a transport with
a membership, :class:`GroupWeightLoader`) declares and nothing else; the receiver keeps the receive state (what was
received, for which version, what is pending). The driver and the actors' method signatures know only
``(handle, version)``; which implementation runs is chosen once, by ``cluster.weight_transport``.

What a publication carries is its :class:`Contents`: the model's full weights, or a LoRA adapter with its config
(``model.lora``); the engine loads each kind through its one path for that kind.

Where transports behave differently, each declares it in its :class:`Capabilities` and callers ask the capability
(``handle.capabilities.lazy``), never the transport's name. Every transport receives beside the engine's generation
(``fetch`` for the object store, a round taken as it is published for the broadcast; neither touches the model), so
that is the contract's, not a capability.

Implementations:
- ``object_store`` (:mod:`rlfleet.transport.object_store`): the state dict packed into one host buffer, one
  ``ray.put``; generators on the same node read it zero-copy from shared memory.
- ``broadcast`` (:mod:`rlfleet.transport.broadcast`): one collective broadcast per publication to a group of the
  learner and the generators, through vLLM's RL weight-transfer API (gloo backend on CPU,
  :mod:`rlfleet.transport.gloo_backend`).
- ``colocated`` (:mod:`rlfleet.transport.colocated`, ``cluster.colocate``): the learner and the engine share a
  process; a publication loads the learner's own tensors into the engine, and the handle carries only the version.
  Not a ``cluster.weight_transport`` choice (:data:`CHOICES`): ``cluster.colocate`` picks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from rlfleet.lora import adapter_config


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do, for the callers that must know.

    - ``lazy``: a publication stays loadable after later ones (its bytes are kept while its handle lives), so a
      generator may keep older weights and load a newer version when it chooses, or load one twice (an evaluation of
      an earlier step). Without it, a publication is received once by every member, at publication.
    - ``membership``: a publication reaches a group of generators named when it is made (``connect``); a generator
      outside that group must wait for a publication that includes it. The engine then takes part in a
      weight-transfer group of vLLM's RL API.
    - ``adapters``: it carries a LoRA adapter (:class:`Contents` of kind ``adapter``), not only full weights.
    """

    lazy: bool
    membership: bool
    adapters: bool


@dataclass(frozen=True)
class Contents:
    """What a publication carries: the model's full weights under Hugging Face names (``adapter_config`` None), or
    a LoRA adapter's tensors under peft's names (as ``adapter_model.safetensors`` holds them) with ``adapter_config``,
    the adapter's config as ``adapter_config.json`` holds it (what vLLM's ``PEFTHelper`` reads)."""

    adapter_config: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        """``"full"`` or ``"adapter"``: the engine's loader for it is looked up by this."""
        return "full" if self.adapter_config is None else "adapter"


FULL = Contents()


def published_contents(lora) -> Contents:
    """What a learner publishes under ``model.lora`` (``lora``, a :class:`~rlfleet.config.LoraConfig` or None): the
    adapter alone with its config, or the full weights without one."""
    return FULL if lora is None else Contents(adapter_config(lora))


@dataclass(frozen=True)
class WeightHandle:
    """What a publication leaves for the generators: the transport's name, the policy version, a payload only
    that transport reads (for ``object_store``: an object ref, which Ray does not resolve inside a dataclass), and
    what the tensors are (:class:`Contents`)."""

    transport: str
    version: int
    payload: Any
    members: frozenset[str] | None = None  # the generators the publication reached; None: any generator
    contents: Contents = FULL

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
    """What every receiver may call on the engine it loads into (:class:`rlfleet.generation.engine.Engine`, its
    continuous wrapper, or a stand-in). Weights change between requests only (the continuous engine: between two
    engine steps, its requests kept)."""

    @property
    def version(self) -> int:
        """The policy version of the weights loaded."""

    def load_weights(self, state_dict: Mapping[str, Tensor], version: int, contents: Contents = FULL) -> None:
        """Load tensors held in memory (``contents`` says what they are) as ``version``, between requests; returns
        once they are loaded."""


class GroupWeightLoader(WeightLoader, Protocol):
    """What a receiver of a transport with ``membership`` also calls: the engine's side of vLLM's RL weight-transfer
    API. The engine keeps no receive state of its own: which round is staged, for which version, is the receiver's."""

    def join_weight_group(self, init_info: dict) -> None:
        """Join the publisher's weight-transfer group (vLLM's ``init_weight_transfer_engine``; blocks until every
        member has joined)."""

    def start_weight_update(self) -> None:
        """Open a round (vLLM's ``start_weight_update``)."""

    def receive_weights(self, update_info: dict) -> None:
        """Take part in one round's collective (vLLM's ``update_weights``): the weights are staged, the model is not
        touched, so this may run while the engine generates. A round staged and not loaded is replaced."""

    def finish_weight_update(self, version: int) -> None:
        """Load the round staged into the model as ``version`` (vLLM's ``finish_weight_update``); only inside
        :meth:`between_requests`."""

    def between_requests(self, load: Callable[[], int | None]) -> int:
        """Run ``load`` where the weights may change; it returns the version it loaded, or None when it loaded
        nothing. The engine then serves that version (never a KV block cached under older weights). Returns the
        version the engine serves."""


class WeightReceiver(Protocol):
    """The generator's side of one transport: one per generation actor and transport, kept for the actor's life (it
    holds the transport's receive state)."""

    def fetch(self, handle: WeightHandle, timeout_s: float) -> None:
        """Bring the publication's bytes to this node ahead of :meth:`apply`; the engine is not touched, so it may
        run while the engine generates."""

    def apply(self, handle: WeightHandle, engine: WeightLoader) -> int:
        """Load the publication (or, for a transport that is not ``lazy``, the newest received, at least
        ``handle.version``) between requests; returns the version the engine serves."""

    def join(self, init_info: dict, engine: GroupWeightLoader) -> None:
        """A transport with ``membership``: join the publisher's group (the publisher calls it through the actor,
        beside the engine's generation). Others raise."""

    def receive(self, update_info: dict, version: int, engine: GroupWeightLoader) -> None:
        """A transport with ``membership``: take part in the round of publication ``version`` as it is made, beside
        the engine's generation; :meth:`apply` loads it. Others raise."""


CAPABILITIES = {"object_store": Capabilities(lazy=True, membership=False, adapters=True),
                "broadcast": Capabilities(lazy=False, membership=True, adapters=False),
                "colocated": Capabilities(lazy=False, membership=False, adapters=True)}
TRANSPORTS = tuple(CAPABILITIES)
CHOICES = ("object_store", "broadcast")  # cluster.weight_transport's values; colocated comes with cluster.colocate


def capabilities(name: str) -> Capabilities:
    """Transport ``name``'s :class:`Capabilities`."""
    if name not in CAPABILITIES:
        raise ValueError(f"cluster.weight_transport: {name!r} is not one of {CHOICES}")
    return CAPABILITIES[name]


def make_publisher(name: str, dtype, timeout_s: float = 600.0, contents: Contents = FULL,
                   load: Callable[[Mapping[str, Tensor], int, Contents], None] | None = None) -> WeightPublisher:
    """The learner side of transport ``name``; ``dtype`` is the engines' compute dtype, ``contents`` what every
    publication carries (:func:`published_contents`); ``load(state, version, contents)``: for ``colocated`` only,
    the engine's load in the learner's own process."""
    if contents.kind == "adapter" and not capabilities(name).adapters:
        raise ValueError(f"cluster.weight_transport: {name!r} carries full weights only, not a LoRA adapter "
                         "(model.lora); use one that carries adapters: "
                         f"{[n for n in CHOICES if capabilities(n).adapters]}")
    if name == "object_store":
        from rlfleet.transport.object_store import ObjectStorePublisher

        return ObjectStorePublisher(dtype, contents)
    if name == "broadcast":
        from rlfleet.transport.broadcast import BroadcastPublisher

        return BroadcastPublisher(dtype, timeout_s, contents)
    if name == "colocated":
        from rlfleet.transport.colocated import ColocatedPublisher

        if load is None:
            raise ValueError("the colocated transport loads into an engine in the learner's process: pass load")
        return ColocatedPublisher(load, contents)
    raise ValueError(f"cluster.weight_transport: {name!r} is not one of {CHOICES}")


def make_receiver(name: str) -> WeightReceiver:
    """The generator side of transport ``name``."""
    if name == "object_store":
        from rlfleet.transport.object_store import ObjectStoreReceiver

        return ObjectStoreReceiver()
    if name == "broadcast":
        from rlfleet.transport.broadcast import BroadcastReceiver

        return BroadcastReceiver()
    if name == "colocated":
        from rlfleet.transport.colocated import ColocatedReceiver

        return ColocatedReceiver()
    raise ValueError(f"cluster.weight_transport: {name!r} is not one of {CHOICES}")
