"""A learner group: ``cluster.learner_workers`` Ray actors forming one ``torch.distributed`` process group.

The driver talks to rank 0 only, exactly as to a single learner actor: the same methods, the same results. Rank 0
starts the other ranks itself, one per bundle of the learner's placement group (bundle ``r`` for rank ``r``), and
offers them its address for the process group's rendezvous. Each call that needs the whole group (a train step,
gathering the weights, a checkpoint) is fanned out: rank 0 sends the call to every other rank, runs its own part,
then collects theirs. The other ranks are owned by rank 0, so they go when it goes (Ray's ownership), and the
job's recovery, which replaces a lost learner, replaces the whole group.

A rank that dies mid-call breaks the collectives of the others: gloo notices the closed connection at once, NCCL
at the process group's timeout (``cluster.timeout_s``). Rank 0 then finds the dead rank and raises
:class:`~rlfleet.errors.ActorLost` naming it, which the job lifecycle treats like the loss of a single
learner: it recovers from the latest checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlfleet.config import ClusterConfig
from rlfleet.errors import ActorLost
from rlfleet.learner import distributed as dist_
from rlfleet.learner.distributed import Rank, destroy_process_group, init_process_group

T = TypeVar("T")

DEAD_RANK_GRACE_S = 10.0  # after a failed collective, how long rank 0 waits for the others' calls to settle


def learner_options(cfg: ClusterConfig) -> dict:
    """Ray options of each learner rank: its CPUs and GPUs, and, where ``learner_threads`` exceeds its CPUs or is
    ``auto`` (it borrows cores the generators leave idle), OpenMP threads that sleep at a barrier instead of
    spinning. A spinning thread waits out a descheduled one while a generator holds that core: 2 threads on a busy
    neighbour's core took 3.1x one thread's time, 1.2x passive (bench/RESULTS.md section 11). OpenMP reads
    ``OMP_WAIT_POLICY`` once, when torch loads it, so it goes in the actor's environment (merged with the job's
    runtime_env by Ray)."""
    options = {"num_cpus": cfg.learner_num_cpus, "num_gpus": cfg.learner_num_gpus}
    threads = cfg.learner_threads
    if threads == "auto" or (threads is not None and threads > cfg.learner_num_cpus):
        options["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    return options


def rank_bundle_options(rank: int) -> dict:
    """Scheduling of rank ``rank`` in the placement group rank 0 runs in (none outside a placement group)."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)}


class LearnerGroup:
    """Rank 0's side of the group. ``actor_cls(*args, rank=Rank(r, K), rendezvous=(address, port))`` is each other
    rank's actor (a class with a ``follow(method, *args)`` method that calls its learner's ``method``)."""

    def __init__(self, actor_cls: type, args: tuple, cfg: ClusterConfig, device, rendezvous=None,
                 rank: Rank | None = None):
        self.timeout_s = cfg.timeout_s
        self.rank = rank or Rank(0, cfg.learner_workers)
        self.workers: list[ray.actor.ActorHandle] = []
        if not self.rank.sharded:
            return
        store = None
        if self.rank.leader:
            store = dist_.host_store(ray.util.get_node_ip_address(), self.rank.world, self.timeout_s)
            rendezvous = (ray.util.get_node_ip_address(), store.port)
            options = learner_options(cfg)
            # rank r is "<rank 0's name>-rank<r>-<rank 0's id>": found by operators and tests, and unique to this
            # group, so a recovered job's new group never waits for the old one's names to be released
            context = ray.get_runtime_context()
            name, life = context.get_actor_name(), context.get_actor_id()[:8]
            for r in range(1, self.rank.world):
                named = {"name": f"{name}-rank{r}-{life}"} if name else {}
                self.workers.append(ray.remote(actor_cls).options(**options, **named, **rank_bundle_options(r)).remote(
                    *args, rank=Rank(r, self.rank.world), rendezvous=rendezvous))
        init_process_group(self.rank, *rendezvous, device, self.timeout_s, store)

    def run(self, method: str, args: tuple, own: Callable[[], T]) -> T:
        """``method(*args)`` on every other rank and ``own()`` here, together (their collectives meet); returns
        ``own()``'s result once every rank is done. Arguments go through the object store once."""
        if not self.workers:
            return own()
        refs = [ray.put(a) for a in args]
        calls = [w.follow.remote(method, *refs) for w in self.workers]
        try:
            result = own()
        except Exception as err:
            self._raise_if_rank_lost(calls, err)
            raise
        self._collect(calls, method)
        return result

    def _collect(self, calls: list, method: str) -> None:
        for r, ref in enumerate(calls, start=1):
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayActorError as err:
                raise ActorLost(f"learner rank {r} of {self.rank.world} died during {method}: {err}") from err
            except ray.exceptions.GetTimeoutError:
                raise ActorLost(f"learner rank {r} of {self.rank.world} did not finish {method} within "
                                f"cluster.timeout_s={self.timeout_s:g} s") from None

    def _raise_if_rank_lost(self, calls: list, err: Exception) -> None:
        """After rank 0's own part failed: when another rank died, say which (the job recovers from that)."""
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=DEAD_RANK_GRACE_S)
        for r, ref in enumerate(calls, start=1):
            if ref not in ready:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as lost:
                raise ActorLost(f"learner rank {r} of {self.rank.world} died; rank 0's collective failed with: "
                                f"{type(err).__name__}: {err}") from lost
            except Exception:
                pass

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        destroy_process_group()


def follow(learner: Any, method: str, *args):
    """A non-zero rank's part of a group call: its learner's ``method(*args)`` (results stay on rank 0)."""
    getattr(learner, method)(*args)
