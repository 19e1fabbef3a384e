"""Ray wrapper of :class:`~rlfleet.learner.policy.PolicyLearner`: pulls batches from the replay actor, publishes
weights through the configured transport (:mod:`rlfleet.transport`). Each method delegates in a line or two; the
logic lives in ``policy.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray

from rlfleet.config import RLFleetConfig
from rlfleet.learner.policy import PolicyLearner
from rlfleet.transport import WeightHandle, make_publisher


SAMPLES_PER_STEP = 4


@dataclass(frozen=True)
class StepResult:
    """One learner step as the driver sees it: metrics, the published weights, and the batch the learner took
    (``prompt_ids`` of its groups, in order): the learner's own report of what it trained."""

    metrics: dict[str, float]
    weights: WeightHandle
    prompt_ids: list[str]
    samples: list[dict] = field(default_factory=list)  # a few groups' first completion, for the loggers

    @property
    def version(self) -> int:
        return self.weights.version


class LearnerActor:
    """Created with :func:`make_learner_actor`; ``replay`` is the name of the replay actor (as for the generation
    actors: a name survives a restart, a constructor argument handle may not)."""

    def __init__(self, cfg: RLFleetConfig, replay: str):
        self.learner = PolicyLearner(cfg.model, cfg.algorithm, cfg.learner, cfg.generation, cfg.seed)
        self.publisher = make_publisher(cfg.cluster.weight_transport, self.learner.compute_dtype)
        self.replay = ray.get_actor(replay)
        self.groups_per_step = cfg.learner.groups_per_step
        self.rpc_timeout_s = cfg.cluster.timeout_s

    def train_step(self, timeout_s: float) -> StepResult | None:
        """Sample ``groups_per_step`` groups from the replay actor (waiting up to ``timeout_s``), train on them and
        publish the new weights, one call per step so the driver can start the next step at once. None when the
        replay actor has no full batch in time; the driver decides what to do then."""
        request = self.replay.sample.remote(self.groups_per_step, self.learner.policy_version, timeout_s)
        groups = ray.get(request, timeout=timeout_s + self.rpc_timeout_s)
        if groups is None:
            return None
        metrics = self.learner.train_step(groups)
        samples = [{"prompt_id": g.prompt_id, "reward": float(g.rewards[0]), "completion": g.meta.get("completion", "")}
                   for g in groups[:SAMPLES_PER_STEP]]
        return StepResult(metrics, self.publish_weights(), [g.prompt_id for g in groups], samples)

    def publish_weights(self) -> WeightHandle:
        """Publish the current policy through the transport. The driver's ``ray.get`` of this call yields the small
        handle (object refs inside it are never resolved), so bulk data never passes through the driver."""
        return self.publisher.publish(self.learner.model.state_dict(), self.learner.policy_version)

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)

    def version(self) -> int:
        return self.learner.policy_version


def make_learner_actor(cfg: RLFleetConfig, replay: str, **options: Any) -> ray.actor.ActorHandle:
    """Start a :class:`LearnerActor` with the learner's resources from ``cfg.cluster``; ``options`` (any
    ``ray.remote`` option: name, scheduling_strategy, num_gpus ...) override them."""
    options = {"num_cpus": cfg.cluster.learner_num_cpus, "num_gpus": cfg.cluster.learner_num_gpus, **options}
    return ray.remote(LearnerActor).options(**options).remote(cfg, replay)
