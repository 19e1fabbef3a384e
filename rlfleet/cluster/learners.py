"""The learner group: the learner's ranks as the job creates, places and holds them.

``cluster.learner_workers`` Ray actors (:class:`~rlfleet.learner.actor.LearnerActor`, one per bundle of the
learner's placement group: rank r in bundle r) form one ``torch.distributed`` process group, gloo on CPU and NCCL on
GPU, meeting at a rendezvous store the job hosts (:func:`~rlfleet.rendezvous.host_store`). With one worker it is a
single actor and no process group. The job calls every method on every rank together (:meth:`LearnerGroup.call`,
one argument upload for all) and takes rank 0's answer (:meth:`LearnerGroup.get`), as OpenRLHF's actor groups do.

A rank that dies mid-call breaks the collectives of the others: gloo notices the closed connection at once, NCCL at
the process group's timeout (``cluster.timeout_s``). :meth:`LearnerGroup.get` then finds the dead rank and raises
:class:`~rlfleet.errors.ActorLost` naming it, which the job lifecycle treats like the loss of a single learner: it
recovers from the latest checkpoint with a new group.

Rank 0 is named after the group (``rlfleet-learner``), rank r > 0 ``<name>-rank<r>-<life>``, unique to this group
so that a recovered job's new group never waits for the old one's names to be released.
"""

from __future__ import annotations

import uuid

import ray

from rlfleet.cluster.runtime import Placement
from rlfleet.cluster.signals import call
from rlfleet.config import RLFleetConfig
from rlfleet.errors import ActorLost, StartRefused
from rlfleet.learner.actor import LearnerActor, LearnerFactory, learner_options
from rlfleet.learner.distributed import Rank
from rlfleet.rendezvous import host_store

DEAD_RANK_GRACE_S = 10.0  # after rank 0 failed, how long to wait for the other ranks' calls to settle


class LearnerGroup:
    """The learner's ranks (see the module doc), placed in ``placement``'s bundles. ``replay``: the replay actor's
    name (``rlfleet train``), None for ``rlfleet dpo``; ``make_learner(cfg, rank)`` builds each rank's learner.
    ``actor``: the Ray actor class of a rank (default :class:`LearnerActor`; ``cluster.colocate``: the colocated
    actor's), built with ``(cfg, replay, make_learner, rank, rendezvous, *extra_args)``."""

    def __init__(self, cfg: RLFleetConfig, make_learner: LearnerFactory, replay: str | None, name: str,
                 placement: Placement | None = None, actor=None, extra_args: tuple = ()):
        self.world, self.timeout_s = cfg.cluster.learner_workers, cfg.cluster.timeout_s
        self.store, rendezvous = None, None
        if self.world > 1:  # held here for the group's life: the ranks meet at it, and a restarted one again
            address = ray.util.get_node_ip_address()
            self.store = host_store(address, self.world, self.timeout_s)
            rendezvous = (address, self.store.port)
        life = uuid.uuid4().hex[:8]
        actor = actor or ray.remote(LearnerActor)
        self.ranks = []
        for r in range(self.world):
            options = {**learner_options(cfg.cluster), "name": name if r == 0 else f"{name}-rank{r}-{life}",
                       **(placement.options(bundle=r) if placement is not None else {})}
            self.ranks.append(actor.options(**options).remote(
                cfg, replay, make_learner, Rank(r, self.world), rendezvous, *extra_args))
        self.others: dict[ray.ObjectRef, list[ray.ObjectRef]] = {}  # by rank 0's: the other ranks' part of a call

    def call(self, method: str, *args) -> ray.ObjectRef:
        """``method(*args)`` on every rank, together (their collectives meet); rank 0's answer's ref, to wait for
        with the job's other work and to read with :meth:`get`. Arguments go through the object store once (an
        ``ObjectRef`` argument is passed as is)."""
        if self.world > 1:
            args = tuple(a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args)
        calls = [getattr(actor, method).remote(*args) for actor in self.ranks]
        self.others[calls[0]] = calls[1:]
        return calls[0]

    def get(self, ref: ray.ObjectRef, what: str):
        """Rank 0's answer (:func:`~rlfleet.cluster.signals.call`: a timeout, a stop request, a lost actor named),
        once every rank is done; :class:`~rlfleet.errors.ActorLost` naming a rank that died."""
        others = self.others.pop(ref, [])
        try:
            result = call(ref, self.timeout_s, what)
        except (ActorLost, StartRefused):  # StartRefused: rank 0 refused its config (the others did the same)
            raise
        except Exception as err:
            self._raise_if_rank_lost(others, err)
            raise
        for r, other in enumerate(others, start=1):
            try:
                ray.get(other, timeout=self.timeout_s)
            except ray.exceptions.RayActorError as err:
                raise ActorLost(f"learner rank {r} of {self.world} died during {what}: {err}") from err
            except ray.exceptions.GetTimeoutError:
                raise ActorLost(f"learner rank {r} of {self.world} did not finish {what} within "
                                f"cluster.timeout_s={self.timeout_s:g} s") from None
        return result

    def run(self, method: str, *args, what: str = "the learner"):
        """:meth:`call` and :meth:`get` in one: a call the job waits for."""
        return self.get(self.call(method, *args), what)

    def _raise_if_rank_lost(self, others: list[ray.ObjectRef], err: Exception) -> None:
        """After rank 0's part failed: when another rank died, say which (the job recovers from that)."""
        ready, _ = ray.wait(others, num_returns=len(others), timeout=DEAD_RANK_GRACE_S)
        for r, ref in enumerate(others, start=1):
            if ref not in ready:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as lost:
                raise ActorLost(f"learner rank {r} of {self.world} died; rank 0's collective failed with: "
                                f"{type(err).__name__}: {err}") from lost
            except Exception:
                pass

    def kill(self) -> None:
        """Kill every rank for good (those already gone are ignored) and close the rendezvous."""
        for actor in self.ranks:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.ranks, self.store, self.others = [], None, {}
