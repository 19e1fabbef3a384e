"""Online DPO (``algorithm.name: online_dpo``): the generation fleet's scored groups become preference pairs, and the
DPO learner trains on them with BEMA updates of its reference.

The rest of ``rlfleet train`` is unchanged: the generators sample ``num_generations`` completions per prompt and
score them, the replay actor queues the groups under the staleness bound (its ``zero_variance`` rule applies; a
group whose rewards are all equal holds no pair), and each learner step takes ``learner.groups_per_step`` groups,
forms their pairs (:func:`preference_pairs`), takes one DPO step on them (:class:`~rlfleet.dpo.learner.DPO`:
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

import math
from pathlib import Path

import numpy as np

from rlfleet.config import DPOConfig, LearnerConfig, ModelConfig, RLFleetConfig
from rlfleet.dpo.data import PreferencePair
from rlfleet.dpo.learner import DPO, dpo_trainee, mean_by_pairs
from rlfleet.learner.core import Learner, Loss, Micro, Plan
from rlfleet.learner.distributed import SINGLE, Rank
from rlfleet.learner.policy import batch_metrics
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


DPO_OWN = ("rewards/", "logps/", "policy_accuracy")  # the DPO step's metrics that online DPO reports under dpo/


class OnlineDPO:
    """Online DPO's objective: :class:`~rlfleet.dpo.learner.DPO` on the pairs of the fleet's groups (see the module
    doc). A step without a pair plans no micro-batch, so the learner makes no update (``dpo/skipped_steps``) but
    still counts the version."""

    def __init__(self, dpo: DPO):
        self.dpo, self.cfg = dpo, dpo.cfg
        self.skipped_steps = 0  # steps without a pair, over the run (checkpointed)

    @property
    def bema(self):
        return self.dpo.bema

    def plan(self, groups: list[Group], version: int) -> Plan:
        pairs, margins, unpaired = preference_pairs(groups, self.cfg.pairs, self.cfg.min_reward_margin)
        plan = self.dpo.plan(pairs, version) if pairs else Plan([])
        self.skipped_steps += not pairs
        plan.context |= {"groups": groups, "version": version, "pairs": pairs, "margins": margins,
                         "unpaired": unpaired}
        return plan

    def loss(self, plan: Plan, micro: Micro) -> Loss:
        return self.dpo.loss(plan, micro)

    def after_step(self, step: int) -> dict[str, float]:
        return self.dpo.after_step(step)

    def report(self, plan: Plan, records, common: dict[str, float]) -> dict[str, float]:
        """The DPO step's metrics (``loss``, ``grad_norm``, ``lr``, ``bema/*``, NaN loss and norm without a pair;
        ``dpo/rewards/*`` (DPO's implicit rewards), ``dpo/logps/*``, ``dpo/policy_accuracy``), the task rewards
        and staleness of the groups (``reward/*``, ``staleness/*``, as GRPO), ``dpo/pairs``, ``dpo/reward_margin``
        (mean task-reward margin of the pairs), ``dpo/unpaired_groups``, ``dpo/skipped_steps`` and
        ``dpo/optimizer_steps``, ``learner/sequences`` (two per pair) and ``learner/tokens``, ``policy_version``."""
        c = plan.context
        step = {"loss": math.nan, "grad_norm": math.nan, "learner/tokens": 0.0, "lr": common["lr"]}
        if records:  # DPO's own metrics under dpo/: beside rewards/<function>/mean, a reward function may be "chosen"
            step = {("dpo/" + k if k.startswith(DPO_OWN) else k): v
                    for k, v in (mean_by_pairs(records) | common).items()}
        return step | batch_metrics(c["groups"], c["version"]) | {
            "dpo/pairs": float(len(c["pairs"])),
            "dpo/reward_margin": float(np.mean(c["margins"])) if c["margins"] else math.nan,
            "dpo/unpaired_groups": float(c["unpaired"]),
            "dpo/skipped_steps": float(self.skipped_steps),
            "dpo/optimizer_steps": float(self.dpo.step),
            "learner/sequences": 2.0 * len(c["pairs"]),
            "policy_version": float(c["version"] + 1),
        }

    def state(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state(self, state: dict) -> None:
        self.dpo.load_state(state)
        self.skipped_steps = int(state["skipped_steps"])

    def save(self, directory: Path) -> None:
        self.dpo.save(directory)

    def load(self, directory: Path) -> None:
        self.dpo.load(directory)

    def save_bema(self, directory: Path) -> None:
        """The BEMA weights (``dpo.bema``), as ``rlfleet dpo`` writes them to ``output_dir/bema``."""
        self.dpo.save_bema(directory)


def OnlineDPOLearner(model_cfg: ModelConfig, dpo_cfg: DPOConfig, learner_cfg: LearnerConfig, seed: int = 0,
                     rank: Rank = SINGLE) -> Learner:
    """The learner of ``algorithm.name: online_dpo``: DPO's trainee (:func:`~rlfleet.dpo.learner.dpo_trainee`) trained
    for :class:`OnlineDPO`."""
    trainee = dpo_trainee(model_cfg, dpo_cfg, learner_cfg, seed, rank)
    return Learner(trainee, OnlineDPO(DPO(trainee, dpo_cfg)))


def online_dpo_learner(cfg: RLFleetConfig, rank: Rank) -> Learner:
    """The learner actor's ``make_learner`` for ``algorithm.name: online_dpo``."""
    return OnlineDPOLearner(cfg.model, cfg.dpo, cfg.learner, cfg.seed, rank)
