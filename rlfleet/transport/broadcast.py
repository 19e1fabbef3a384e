"""Weights by collective broadcast through vLLM's RL weight-transfer API (``cluster.weight_transport: broadcast``).

The learner (rank 0) and the generation actors (ranks 1..G) form one weight-transfer group; each publication is one
round of vLLM's protocol, driven by vLLM's own trainer engine (``WeightTransferTrainerFactory.trainer_init`` /
``send_weights``) with rlfleet's gloo backend (:mod:`rlfleet.transport.gloo_backend`) through
:class:`GeneratorsClient`, which reaches the generation actors over Ray:

- ``init_weight_transfer_engine`` -> each actor's ``join_weight_group`` (its own rank in the group);
- ``update_weights`` (the name vLLM's client protocol gives a round's receive) -> each actor's ``receive_weights``,
  run in the actor's ``weights`` concurrency group, so it takes part in the broadcast while the actor's engine keeps
  generating (the backend stages the round; :meth:`BroadcastReceiver.receive` notes its version);
- ``finish_weight_update`` is each generator's own, at its next request boundary: the driver's usual weight update
  before a request (the actor's ``update_weights(handle)``, :meth:`BroadcastReceiver.apply`) loads the newest round
  received, after a version handshake.

Membership follows the fleet: the driver passes the names of the active generators with every learner step; when
they differ from the group's, the group is rebuilt with them and the current weights are sent to it at once, so a
generator that joins (or comes back after a restart) has the current weights before its first request. The handle
of a publication names the generators it reached; the pool sends requests only to those. A generator that dies
during a round fails the round: the group is rebuilt without it and the round sent again (``sync/rebuilds``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import ray
import torch
from torch import Tensor

from rlfleet.transport import CAPABILITIES, FULL, Contents, GroupWeightLoader, WeightHandle

NAME = "broadcast"
DEAD_GRACE_S = 30.0  # after a failed round, how long the members' calls get to fail or return


class GeneratorsLost(RuntimeError):
    """Generation actors that died during a round."""

    def __init__(self, names: list[str], what: str):
        super().__init__(f"{', '.join(names)} died while {what}")
        self.names = names


class GeneratorsClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over generation actors (``handles`` in rank order)."""

    def __init__(self, handles: dict[str, ray.actor.ActorHandle], timeout_s: float):
        self.handles, self.timeout_s, self.version = handles, timeout_s, 0

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        # retried across a restart: a member restarting now joins once it is back (rank 0 waits for it)
        self._all({name: h.join_weight_group.options(max_task_retries=-1).remote({**init_info, "rank_offset": 1 + i})
                   for i, (name, h) in enumerate(self.handles.items())}, "joining the weight-transfer group")

    def start_weight_update(self) -> None:
        """Each generator opens its round when it receives (see the module docstring)."""

    def update_weights(self, update_info: dict) -> None:
        """One round's receive on every member (vLLM's protocol names it so; for a generator it is
        ``receive_weights``: staged, not loaded)."""
        self._all({name: h.receive_weights.remote(update_info, self.version) for name, h in self.handles.items()},
                  f"receiving weights version {self.version}")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """Each generator loads the round at its next request boundary (see the module docstring)."""

    def _all(self, refs: dict[str, ray.ObjectRef], what: str) -> None:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        lost = []
        for name, ref in refs.items():
            if ref not in ready:
                raise TimeoutError(f"{name} did not finish {what} within cluster.weight_sync_timeout_s="
                                   f"{self.timeout_s:g} s")
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                lost.append(name)
        if lost:
            raise GeneratorsLost(lost, what)


class StateSource:
    """A ``WeightSource`` over the state dict of the publication at hand (already whole, in the compute dtype:
    a sharded learner gathers it first)."""

    def __init__(self):
        self.state: Mapping[str, Tensor] = {}

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.state.items()]

    def __iter__(self):
        return iter(self.state.items())


class BroadcastPublisher:
    """The learner's side: one weight-transfer group with the generators named at :meth:`connect`."""

    capabilities = CAPABILITIES[NAME]

    def __init__(self, dtype: torch.dtype, timeout_s: float, contents: Contents = FULL):
        self.dtype, self.timeout_s, self.contents = dtype, timeout_s, contents
        self.members: tuple[str, ...] = ()
        self.trainer = None
        self.source = StateSource()
        self.rebuilds = 0  # groups built after the first (fleet changes, lost generators)
        self.built = False

    def connect(self, members: list[str]) -> None:
        """Make the group the learner and ``members`` (keys ``<actor name>@<incarnation>``: a restarted actor is a
        new member). A change rebuilds the group; the next publication reaches every member."""
        if tuple(members) != self.members or (members and self.trainer is None):
            self._build(list(members))

    def publish(self, state: Mapping[str, Tensor], version: int) -> WeightHandle:
        """One round to every member. A round that fails (a member died or was restarted during it) is sent again
        once to a rebuilt group of the members still alive; a second failure is raised."""
        if self.members:
            try:
                self._send(state, version)
            except Exception:  # noqa: BLE001 - any failed collective: rebuild and retry once
                self._build([m for m in self.members if m not in self._dead()])
                if self.members:
                    self._send(state, version)
        return WeightHandle(NAME, int(version), None, members=frozenset(self.members), contents=self.contents)

    def stats(self) -> dict[str, float]:
        return {"sync/rebuilds": float(self.rebuilds)}  # weight-transfer groups rebuilt so far in this life

    def _send(self, state: Mapping[str, Tensor], version: int) -> None:
        self.source.state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        self.trainer.client.version = version
        try:
            self.trainer.send_weights()
        except BaseException:
            self._close()  # a group is unusable after a failed collective (members still receiving wait out
            # its timeout: gloo does not wake them when rank 0 leaves)
            raise
        finally:
            self.source.state = {}

    def _dead(self) -> set[str]:
        """Members to leave out of the rebuilt group: gone for good, or not answering within ``DEAD_GRACE_S`` (a
        restarting one is back by then, or rejoins under its next key when the driver sees the restart)."""
        probes = {key: ray.get_actor(actor_name(key)).version.options(max_task_retries=-1).remote()
                  for key in self.members if _exists(actor_name(key))}
        ready, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=DEAD_GRACE_S)
        dead = {key for key in self.members if key not in probes or probes[key] not in ready}
        for key, ref in probes.items():
            try:
                if ref in ready:
                    ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.add(key)
        return dead

    def _build(self, members: list[str]) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from rlfleet.transport.gloo_backend import GlooTrainerInitInfo, register

        register()
        self.rebuilds += int(self.built)
        self.built = True
        self._close()
        self.members = tuple(members)
        if not members:
            return
        client = GeneratorsClient({key: ray.get_actor(actor_name(key)) for key in members}, self.timeout_s)
        info = GlooTrainerInitInfo(ray.util.get_node_ip_address(), world_size=1 + len(members),
                                   timeout_s=self.timeout_s, rank=0)
        self.trainer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=self.source)

    def _close(self) -> None:
        if self.trainer is not None:
            self.trainer.shutdown()
            self.trainer = None


def actor_name(member: str) -> str:
    """The actor name in a member key ``<actor name>@<incarnation>``."""
    return member.rsplit("@", 1)[0]


def _exists(name: str) -> bool:
    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False


class BroadcastReceiver:
    """The generator's side: rounds received as they are published (beside the engine's generation), the newest
    loaded at the next request boundary. The receive state is here, not in the engine: the version of the round
    staged and not yet loaded, whether vLLM's round is open, and a lock that keeps a round from being received while
    one is being loaded (both touch the backend's staged tensors)."""

    def __init__(self):
        self.staged: int | None = None  # version of the round received and not yet loaded
        self.round_open = False  # start_weight_update was called and its finish is pending
        self.lock = threading.Lock()

    def fetch(self, handle: WeightHandle, timeout_s: float) -> None:
        """Nothing: the round was received at publication, beside the engine's generation."""

    def join(self, init_info: dict, engine: GroupWeightLoader) -> None:
        engine.join_weight_group(init_info)

    def receive(self, update_info: dict, version: int, engine: GroupWeightLoader) -> None:
        """Take part in the round of ``version``; a round not yet loaded is replaced by it."""
        with self.lock:
            if not self.round_open:
                engine.start_weight_update()
                self.round_open = True
            engine.receive_weights(update_info)
            self.staged = int(version)

    def apply(self, handle: WeightHandle, engine: GroupWeightLoader) -> int:
        """Load the last round received, between requests; it must be at least ``handle.version`` (the version
        handshake: an engine that missed that round says so). Returns the version loaded: newer than the handle's
        when a later round arrived first (that one is loaded)."""
        def load() -> int | None:
            with self.lock:  # taken where the load runs (the continuous engine: between two steps), not before
                if self.staged is None or self.staged <= engine.version:
                    return None
                engine.finish_weight_update(self.staged)
                loaded, self.staged, self.round_open = self.staged, None, False
                return loaded

        version = engine.between_requests(load)
        if version < handle.version:
            raise RuntimeError(f"weights version handshake: this engine holds version {version} and received no "
                               f"round of version {handle.version} or later (it was not in the weight-transfer group)")
        return version
