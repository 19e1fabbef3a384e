"""Ray wrapper of :class:`~rlfleet.learner.policy.PolicyLearner`: pulls batches from the replay actor, publishes
weights through the configured transport (:mod:`rlfleet.transport`). Each method delegates in a line or two; the
logic lives in ``policy.py``. With ``cluster.learner_workers`` > 1 this actor is rank 0 of a learner group
(:mod:`rlfleet.learner.group`) and fans each call out to the other ranks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from rlfleet.config import RLFleetConfig
from rlfleet.learner.distributed import Rank
from rlfleet.learner.group import LearnerGroup, follow, learner_options
from rlfleet.learner.policy import PolicyLearner
from rlfleet.learner.trainee import resolve_device
from rlfleet.learner.threads import LearnerThreads, node_cores
from rlfleet.transport import WeightHandle, make_publisher, published_contents


SAMPLES_PER_STEP = 4
# (cfg, rank) -> a learner: train_step(groups), state_dict(), policy_version, save / load ... (PolicyLearner's methods)
LearnerFactory = Callable[[RLFleetConfig, Rank], Any]


@dataclass(frozen=True)
class StepResult:
    """One learner step as the driver sees it: metrics, the published weights, and the batch the learner took
    (the ``prompt_id`` of each of its groups, in order): the learner's own report of what it trained."""

    metrics: dict[str, float]
    weights: WeightHandle
    prompt_record_ids: list[str]  # Group.prompt_id: dataset record ids, not token ids
    samples: list[dict] = field(default_factory=list)  # a few groups' first completion, for the loggers
    replay_stats: dict[str, float] = field(default_factory=dict)  # the replay actor's, as the batch's pull left them

    @property
    def version(self) -> int:
        return self.weights.version


class LearnerActor:
    """Created with :func:`make_learner_actor`; ``replay`` is the name of the replay actor (as for the generation
    actors: a name survives a restart, a constructor argument handle may not)."""

    def __init__(self, cfg: RLFleetConfig, replay: str, make_learner: LearnerFactory | None = None,
                 rank: Rank | None = None, rendezvous=None):
        make_learner = make_learner or policy_learner
        self.threads = LearnerThreads(cfg.cluster.learner_threads, int(cfg.cluster.learner_num_cpus), node_cores())
        self.group = LearnerGroup(LearnerActor, (cfg, replay, make_learner), cfg.cluster,
                                  resolve_device(cfg.learner.device), rendezvous, rank)
        self.learner = make_learner(cfg, self.group.rank)
        self.publisher = make_publisher(cfg.cluster.weight_transport, self.learner.compute_dtype,
                                        cfg.cluster.weight_sync_timeout_s, published_contents(cfg.model.lora))
        self.replay = ray.get_actor(replay)
        self.groups_per_step = cfg.learner.groups_per_step
        self.rpc_timeout_s = cfg.cluster.timeout_s

    def train_step(self, timeout_s: float, generators: list[str] | None = None) -> StepResult | None:
        """Sample ``groups_per_step`` groups from the replay actor (waiting up to ``timeout_s``), train on them and
        publish the new weights (to ``generators``, for a transport with a membership), one call per step so the
        driver can start the next step at once. None when the replay actor has no full batch in time; the driver
        decides what to do then."""
        start = time.perf_counter()
        request = self.replay.sample_with_stats.remote(self.groups_per_step, self.learner.policy_version, timeout_s)
        groups, replay_stats = ray.get(request, timeout=timeout_s + self.rpc_timeout_s)
        waited = time.perf_counter() - start
        if groups is None:
            self.threads.observe(waited, 0.0)
            return None
        metrics = self.group.run("train_step", (groups,), lambda: self.learner.train_step(groups))
        samples = [{"prompt_id": g.prompt_id, "reward": float(g.rewards[0]), "completion": g.meta.get("completion", "")}
                   for g in groups[:SAMPLES_PER_STEP]]
        weights = self.publish_weights(generators)
        metrics["learner/threads"] = float(self.threads.threads)  # this step's (auto may change it for the next)
        self.threads.observe(waited, time.perf_counter() - start - waited)
        metrics |= self.publisher.stats()
        return StepResult(metrics, weights, [g.prompt_id for g in groups], samples, replay_stats)

    def publish_weights(self, generators: list[str] | None = None) -> WeightHandle:
        """Publish the current policy through the transport (``broadcast``: to the group of ``generators``, the
        pool's member keys, rebuilt when they changed). The driver's ``ray.get`` of this call yields the small
        handle (object refs inside it are never resolved), so bulk data never passes through the driver."""
        state = self.group.run("state_dict", (), self.learner.state_dict)
        if generators is not None:
            self.publisher.connect(generators)
        return self.publisher.publish(state, self.learner.policy_version)

    def save(self, directory: str) -> None:
        self.group.run("save", (directory,), lambda: self.learner.save(directory))

    def load(self, directory: str) -> None:
        self.group.run("load", (directory,), lambda: self.learner.load(directory))

    def save_merged(self, directory: str) -> None:
        """Base + LoRA adapter merged, in Hugging Face format (``model.lora.save_merged``)."""
        self.group.run("save_merged", (directory,), lambda: self.learner.save_merged(directory))

    def save_bema(self, directory: str) -> None:
        """Online DPO with ``dpo.bema``: the BEMA weights in Hugging Face format (as ``rlfleet dpo``'s)."""
        self.group.run("save_bema", (directory,), lambda: self.learner.save_bema(directory))

    def follow(self, method: str, *args) -> None:
        """A group call's part on a rank > 0 (:class:`~rlfleet.learner.group.LearnerGroup`)."""
        follow(self.learner, method, *args)

    def version(self) -> int:
        return self.learner.policy_version


def policy_learner(cfg: RLFleetConfig, rank: Rank) -> PolicyLearner:
    """The learner of the GRPO family: the default ``make_learner``."""
    return PolicyLearner(cfg.model, cfg.algorithm, cfg.learner, cfg.generation, cfg.seed, rank)


def make_learner_actor(cfg: RLFleetConfig, replay: str, make_learner: LearnerFactory | None = None,
                       **options: Any) -> ray.actor.ActorHandle:
    """Start a :class:`LearnerActor` with the learner's resources from ``cfg.cluster``; ``make_learner(cfg, rank)``
    builds the learner of each rank (:func:`policy_learner` unless given: the job passes online DPO's,
    :func:`rlfleet.dpo.online.online_dpo_learner`); ``options`` (any ``ray.remote`` option: name,
    scheduling_strategy, num_gpus ...) override the resources."""
    options = {**learner_options(cfg.cluster), **options}
    return ray.remote(LearnerActor).options(**options).remote(cfg, replay, make_learner)
