"""Ray wrapper of :class:`~rlfleet.dpo.learner.DPOLearner`. Each method delegates in one line; the logic lives in
``dpo.py``. Preference pairs arrive from the driver (a few KB per step); nothing else crosses the wire."""

from __future__ import annotations

from typing import Any

import ray

from rlfleet.config import RLFleetConfig
from rlfleet.dpo.learner import DPOLearner
from rlfleet.dpo.data import PreferencePair


class DPOLearnerActor:
    """Created with :func:`make_dpo_learner_actor`."""

    def __init__(self, cfg: RLFleetConfig):
        self.learner = DPOLearner(cfg.model, cfg.dpo, cfg.learner, cfg.seed)

    def train_step(self, pairs: list[PreferencePair]) -> dict[str, float]:
        return self.learner.train_step(pairs)

    def evaluate(self, pairs: list[PreferencePair]) -> dict[str, float]:
        return self.learner.evaluate(pairs)

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)

    def save_bema(self, directory: str) -> None:
        self.learner.save_bema(directory)

    def step(self) -> int:
        return self.learner.step


def make_dpo_learner_actor(cfg: RLFleetConfig, **options: Any) -> ray.actor.ActorHandle:
    """Start a :class:`DPOLearnerActor` with the learner's resources from ``cfg.cluster``; ``options`` (any
    ``ray.remote`` option: name, scheduling_strategy, num_gpus ...) override them."""
    options = {"num_cpus": cfg.cluster.learner_num_cpus, "num_gpus": cfg.cluster.learner_num_gpus, **options}
    return ray.remote(DPOLearnerActor).options(**options).remote(cfg)
