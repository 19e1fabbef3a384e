"""Online DPO (``algorithm.name: online_dpo``): the generation fleet's scored groups become preference pairs, and the
DPO learner trains on them with BEMA updates of its reference.

The rest of ``rlfleet train`` is unchanged: the generators sample ``num_generations`` completions per prompt and
score them, the replay actor queues the groups under the staleness bound (its ``zero_variance`` rule applies; a
group whose rewards are all equal holds no pair), and each learner step takes ``learner.groups_per_step`` groups,
forms their pairs (:func:`preference_pairs`), takes one DPO step on them (:class:`~rlfleet.dpo.learner.DPOLearner`:
the sigmoid loss, ``dpo.beta``, BEMA reference updates, its checkpoint format) and publishes the new weights as a
GRPO step does. TRL's ``OnlineDPOTrainer`` asks a judge or a reward model to rank two completions per prompt in one
process; here the ranking is the reward functions', over every completion of the group, on a distributed fleet.

Pairs from one group's rewards ``r`` (``dpo.pairs``, ``dpo.min_reward_margin`` = m):

- ``best_worst``: the completion with the highest reward (the first of equals) against the one with the lowest (the
  first of equals), if ``r_best - r_worst > m``: at most one pair per group;
- ``all``: every ``(i, j)`` with ``r_i - r_j > m`` (chosen i, rejected j), in index order.

A completion no reward function scored (NaN) is in no pair. A group without a pair is left out of the step and
counted (``dpo/unpaired_groups``); a step whose groups hold no pair at all makes no update (``dpo/skipped_steps``)
but still counts as a version, so the driver's accounting of trained groups holds. Only the model's tokens are
compared: prompts and completions are the engine's token ids, never decoded and encoded again.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rlfleet.config import DPOConfig, LearnerConfig, ModelConfig, RLFleetConfig
from rlfleet.dpo.data import PreferencePair
from rlfleet.dpo.learner import DPOLearner
from rlfleet.learner.distributed import SINGLE, Rank
from rlfleet.learner.policy import batch_metrics, engine_state, save_merged
from rlfleet.types import Group


def group_pairs(rewards: np.ndarray, mode: str, min_margin: float) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` row indices of one group's pairs from its rewards ``[n]`` (see the module doc)."""
    scored = np.flatnonzero(~np.isnan(rewards))
    if mode == "best_worst":
        if len(scored) < 2:
            return []
        best = int(scored[np.argmax(rewards[scored])])  # argmax / argmin: the first of equals
        worst = int(scored[np.argmin(rewards[scored])])
        return [(best, worst)] if rewards[best] - rewards[worst] > min_margin else []
    if mode == "all":
        return [(int(i), int(j)) for i in scored for j in scored if rewards[i] - rewards[j] > min_margin]
    raise ValueError(f"dpo.pairs: unknown mode {mode!r}; use best_worst or all")


def preference_pairs(groups: list[Group], mode: str = "best_worst", min_margin: float = 0.0
                     ) -> tuple[list[PreferencePair], list[float], int]:
    """The pairs of every group, in group order; each pair's reward margin; the number of groups without a pair."""
    pairs, margins, unpaired = [], [], 0
    for g in groups:
        rows = group_pairs(np.asarray(g.rewards, dtype=np.float64), mode, min_margin)
        unpaired += not rows
        prompt = [int(t) for t in g.prompt_token_ids]
        for c, r in rows:
            pairs.append(PreferencePair(prompt, completion(g, c), completion(g, r)))
            margins.append(float(g.rewards[c] - g.rewards[r]))
    return pairs, margins, unpaired


def completion(group: Group, row: int) -> list[int]:
    """Row ``row``'s completion tokens, without the padding."""
    return [int(t) for t in group.completion_ids[row, :int(group.completion_lengths[row])]]


class OnlineDPOLearner:
    """The learner of ``algorithm.name: online_dpo``: :class:`~rlfleet.dpo.learner.DPOLearner` fed with groups,
    with :class:`~rlfleet.learner.policy.PolicyLearner`'s interface to the learner actor (``train_step(groups)``,
    ``state_dict``, ``policy_version``, ``save`` / ``load``, ``save_merged``).

    ``policy_version`` counts learner steps (publications), ``self.dpo.step`` optimizer steps: BEMA's clock. They
    differ only after steps without a pair.
    """

    def __init__(self, model_cfg: ModelConfig, dpo_cfg: DPOConfig, learner_cfg: LearnerConfig, seed: int = 0,
                 rank: Rank = SINGLE):
        self.cfg, self.rank = dpo_cfg, rank
        self.dpo = DPOLearner(model_cfg, dpo_cfg, learner_cfg, seed, rank=rank)
        self.compute_dtype = self.dpo.compute_dtype
        self.policy_version = 0
        self.skipped_steps = 0  # steps without a pair, over the run (checkpointed)

    @property
    def model(self) -> torch.nn.Module:
        return self.dpo.model

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """Pairs from ``groups``, one DPO step on them (none without a pair), the next version. Metrics: the DPO
        step's (``loss``, ``rewards/*`` (DPO's implicit rewards), ``logps/*``, ``policy_accuracy``, ``grad_norm``,
        ``lr``, ``bema/*``), the task rewards and staleness of the groups (``reward/*``, ``staleness/*``, as GRPO),
        ``dpo/pairs``, ``dpo/reward_margin`` (mean task-reward margin of the pairs), ``dpo/unpaired_groups``,
        ``dpo/skipped_steps`` and ``dpo/optimizer_steps``, ``learner/sequences`` (two per pair) and ``learner/tokens``,
        ``time/step_s``, ``policy_version``."""
        start = time.perf_counter()
        pairs, margins, unpaired = preference_pairs(groups, self.cfg.pairs, self.cfg.min_reward_margin)
        version_before = self.policy_version
        if pairs:
            metrics = self.dpo.train_step(pairs)
        else:
            self.skipped_steps += 1
            metrics = {"loss": math.nan, "grad_norm": math.nan, "learner/tokens": 0.0,
                       "lr": self.dpo.optimizer.param_groups[0]["lr"]}
        metrics.pop("step", None)
        metrics.pop("learner/pairs", None)
        self.policy_version += 1
        return metrics | batch_metrics(groups, version_before) | {
            "dpo/pairs": float(len(pairs)),
            "dpo/reward_margin": float(np.mean(margins)) if margins else math.nan,
            "dpo/unpaired_groups": float(unpaired),
            "dpo/skipped_steps": float(self.skipped_steps),
            "dpo/optimizer_steps": float(self.dpo.step),
            "learner/sequences": 2.0 * len(pairs),
            "time/step_s": time.perf_counter() - start,
            "policy_version": float(self.policy_version),
        }

    def state_dict(self) -> dict[str, Tensor]:
        """What the engines load (:func:`~rlfleet.learner.policy.engine_state`)."""
        return engine_state(self.dpo.model, self.dpo.lora, self.rank, self.compute_dtype)

    def save(self, directory: str | Path) -> None:
        """The DPO learner's checkpoint (:meth:`~rlfleet.dpo.learner.DPOLearner.save`) and ``online.json``
        (policy_version, skipped steps). Every rank of a group calls it."""
        self.dpo.save(directory)
        if self.rank.leader:
            (Path(directory) / "online.json").write_text(json.dumps({"policy_version": self.policy_version,
                                                                    "skipped_steps": self.skipped_steps}))

    def load(self, directory: str | Path) -> None:
        self.dpo.load(directory)
        state = json.loads((Path(directory) / "online.json").read_text())
        self.policy_version, self.skipped_steps = int(state["policy_version"]), int(state["skipped_steps"])

    def save_merged(self, directory: str | Path) -> None:
        save_merged(self.dpo.model, self.dpo.peft, self.dpo.tokenizer, self.dpo.lora, Path(directory), self.rank)

    def save_bema(self, directory: str | Path) -> None:
        """The BEMA weights (``dpo.bema``), as ``rlfleet dpo`` writes them to ``output_dir/bema``."""
        self.dpo.save_bema(directory)


def online_dpo_learner(cfg: RLFleetConfig, rank: Rank) -> OnlineDPOLearner:
    """The learner actor's ``make_learner`` for ``algorithm.name: online_dpo``."""
    return OnlineDPOLearner(cfg.model, cfg.dpo, cfg.learner, cfg.seed, rank)
