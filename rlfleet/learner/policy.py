"""The policy-gradient objective: GRPO / GSPO / GSPO-token optimisation steps on batches of
:class:`~rlfleet.types.Group`.

:class:`PolicyGradient` plugs into :class:`~rlfleet.learner.core.Learner`, which runs the micro-batch loop on a
:class:`~rlfleet.learner.trainee.Trainee` (model, reference, LoRA, FSDP2, optimizer, checkpoints); plain classes, no
Ray: :class:`~rlfleet.learner.actor.LearnerActor` wraps the learner, and tests run it in-process.

One ``train_step(groups)``:

1. **Collate** the groups into one padded batch (:func:`collate`): prompts left-padded to a common length ``P``,
   completions right-padded to ``T``, so every completion starts at column ``P``; positions count real tokens
   only, so padding changes no log-probability.
2. **Log-probabilities** of the completion tokens, ``log softmax(logits / temperature)`` at the sampled tokens
   (:func:`completion_logprobs`), the same temperature-scaled distribution the generator's behaviour log-probs
   ``behaviour_logprobs`` were taken from.
3. **One normaliser** for the whole optimizer step (``loss_normalizer`` over the full batch's mask), so the
   micro-batch losses of ``learner.micro_batch_size`` sequences sum to the full-batch loss and the gradient does
   not depend on micro-batching. Backward per micro-batch, then gradient clipping and one optimizer step.
4. ``num_iterations`` (mu) passes over the same batch, each ending with an optimizer step (decoupled PPO):

   * mu == 1: the ratio's base (the *proximal* policy) is the behaviour policy itself, ``behaviour_logprobs`` from
     the generator, and no importance weights are used: the clipped ratio pi_theta / pi_behaviour does the
     off-policy correction.
   * mu > 1: the proximal policy is the learner's own policy before the first update (log-probs computed without
     gradient, detached), so the first pass has ratio 1 and later passes are clipped against it, as in PPO. The
     gap between that proximal policy and the (possibly stale) behaviour policy is corrected by truncated
     importance weights ``min(pi_proximal / pi_behaviour, importance_sampling_cap)`` on the policy term
     (:func:`importance_weights`; per token, or per sequence for the sequence levels), when the cap is set.
   * ``algorithm.rollout_correction`` (truncate / mask) at any mu: the proximal policy is the learner's own
     pre-step policy (at mu == 1 the pass's log-probs, detached: the ratio is 1 in value, the gradient PG's), and
     the policy term is weighted by ``rollout_weights``: the engine-vs-learner ratio of each token (each token's own
     behaviour log-prob, whatever weights sampled it), sequence or geometric mean, truncated or masked to a band.

   Every step logs the gap between the engine's and the learner's pre-step log-probs (``rollout/kl``,
   ``rollout/ratio/min`` and ``/max``: :func:`~rlfleet.learner.losses.rollout_gap`), corrected or not.

   The lr schedule advances once per ``train_step``: ``max_steps`` and ``warmup_steps`` count train steps, and
   the mu passes over one batch share its lr. ``policy_version`` counts train steps, i.e. weight publications: the
   staleness bound is in these units.

Parameters are float32 master weights, forward passes under autocast in ``model.dtype``'s compute dtype, and the
frozen reference (beta > 0) in that dtype: see :mod:`rlfleet.learner.trainee`. The step is deterministic: dropout is
disabled (as the generator samples without it), nothing is shuffled, and no random number is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, ModelConfig
from rlfleet.learner.core import Learner, Loss, Micro, NoState, Plan
from rlfleet.learner.distributed import SINGLE, Rank, micro_batches
from rlfleet.learner.losses import loss_normalizer, make_policy_loss, rollout_gap, rollout_weights
from rlfleet.learner.trainee import Trainee
from rlfleet.types import Group


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces: collation, log-probabilities, importance weights, lr schedule
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One optimizer step's sequences, padded. ``P`` = longest prompt, ``T`` = longest completion."""

    input_ids: Tensor  # [B, P+T] long  prompt left-padded to P, completion right-padded to T
    attention_mask: Tensor  # [B, P+T] long  1 on real tokens
    position_ids: Tensor  # [B, P+T] long  0-based index among the row's real tokens
    completion_ids: Tensor  # [B, T] long
    mask: Tensor  # [B, T] float  1 on completion tokens that are trained on
    behaviour_logprobs: Tensor  # [B, T] float  behaviour log-probs, 0 on padding
    advantages: Tensor  # [B] float

    @property
    def size(self) -> int:
        return int(self.advantages.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def split(self, micro_batch_size: int, rank: Rank = SINGLE) -> list[tuple[Batch, bool]]:
        """This rank's micro-batches of at most ``micro_batch_size`` sequences, each with ``real`` (False for a
        filler whose loss counts 0: :func:`~rlfleet.learner.distributed.micro_batches`)."""
        return [(self.rows(m.start, m.stop), m.real) for m in micro_batches(self.size, micro_batch_size, rank)]


def trained_tokens(g: Group, fresh_from: int | None = None) -> np.ndarray:
    """bool ``[n, T]``: the tokens of ``g`` the loss trains: the model's, and under the token staleness unit only
    those sampled at version ``fresh_from`` or later (the step's version minus ``replay.max_staleness``)."""
    mask = g.model_token_mask
    return mask if fresh_from is None else mask & (g.versions >= fresh_from)


def collate(groups: list[Group], pad_id: int, mask_truncated_completions: bool = False,
            fresh_from: int | None = None) -> Batch:
    """Pad the groups' rows into one :class:`Batch`, rows in group order.

    Row ``i`` with prompt ``p`` (length ``P_i``) and completion ``c`` (length ``L_i``) becomes
    ``[pad] * (P - P_i) + p + c + [pad] * (T - L_i)``; ``mask[i, t] = 1`` for ``t < L_i`` where the token is the
    model's (``Group.loss_mask``: an environment's tokens in a multi-turn episode are context, never trained), and
    the whole row is 0
    when ``mask_truncated_completions`` and the completion was truncated (TRL's semantics; its advantage was
    still computed with the group). With ``fresh_from`` (``replay.staleness_unit: token``) tokens sampled at an older
    version are 0 too (:func:`trained_tokens`); their group's advantages still count them, as the reward did.
    """
    if not groups:
        raise ValueError("collate: got no groups; a train step needs at least one group")
    prompts = [g.prompt_token_ids for g in groups for _ in range(g.size)]
    lengths = np.concatenate([g.completion_lengths for g in groups]).astype(np.int64)  # [B]
    B, P, T = len(prompts), max(len(p) for p in prompts), max(int(lengths.max()), 1)
    input_ids = np.full((B, P + T), pad_id, dtype=np.int64)  # [B, P+T]
    attention_mask = np.zeros((B, P + T), dtype=np.int64)  # [B, P+T]
    completion_ids = np.full((B, T), pad_id, dtype=np.int64)  # [B, T]
    behaviour_logprobs = np.zeros((B, T), dtype=np.float32)  # [B, T]
    row = 0
    for g in groups:
        for j in range(g.size):
            n, prompt = int(g.completion_lengths[j]), g.prompt_token_ids
            completion_ids[row, :n] = g.completion_ids[j, :n]
            behaviour_logprobs[row, :n] = g.behaviour_logprobs[j, :n]
            input_ids[row, P - len(prompt) : P] = prompt
            input_ids[row, P : P + n] = completion_ids[row, :n]
            attention_mask[row, P - len(prompt) : P + n] = 1
            row += 1
    mask = np.zeros((B, T), dtype=np.float32)  # [B, T]
    row = 0
    for g in groups:
        width = min(g.completion_ids.shape[1], T)
        mask[row:row + g.size, :width] = trained_tokens(g, fresh_from)[:, :width]
        row += g.size
    if mask_truncated_completions:
        mask *= ~np.concatenate([g.truncated for g in groups])[:, None]
    attention = torch.from_numpy(attention_mask)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),  # [B, P+T]
        completion_ids=torch.from_numpy(completion_ids),
        mask=torch.from_numpy(mask),
        behaviour_logprobs=torch.from_numpy(behaviour_logprobs),
        advantages=torch.from_numpy(np.concatenate([g.advantages for g in groups]).astype(np.float32)),
    )




def importance_weights(
    proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, level: str, cap: float
) -> Tensor:
    """Truncated importance weights of the learner's proximal policy against the behaviour policy, ``[B, T]``.

    token level:                 w_{i,t} = min(exp(prox_{i,t} - beh_{i,t}), cap)
    sequence / sequence_token:   w_i     = min(exp(sum_t m_{i,t} (prox_{i,t} - beh_{i,t})), cap), same on every t
    (the sequence probability ratio, as TRL's ``sequence_truncate`` vLLM correction). Padding contributes a log
    ratio of 0. No gradient flows (both inputs are detached log-probs).
    """
    log_ratio = (proximal_logprobs - behaviour_logprobs) * mask  # [B, T]
    if level != "token":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)  # [B, T]
    return log_ratio.clamp(max=math.log(cap)).exp()  # [B, T]



def combine_loss_metrics(records: list[tuple[dict[str, float], float]], num_passes: int) -> dict[str, float]:
    """Combine the loss metrics of every micro-batch of every pass; ``records`` holds (metrics, valid tokens).

    ``loss/policy`` is already normalised per step, so micro-batches sum (then / ``num_passes``); ``*/min`` and
    ``*/max`` take the NaN-ignoring min / max; every other key is a token mean: sum(v * n) / sum(n) (0 without
    tokens).
    """
    tokens = sum(n for _, n in records)
    out: dict[str, float] = {}
    for key in records[0][0] if records else []:
        values = [m[key] for m, _ in records]
        if key == "loss/policy":
            out[key] = sum(values) / num_passes
        elif key.endswith(("/min", "/max")):
            real = [v for v in values if not math.isnan(v)]
            out[key] = (min if key.endswith("/min") else max)(real) if real else math.nan
        else:
            out[key] = sum(v * n for v, (_, n) in zip(values, records)) / max(tokens, 1.0)
    return out



def batch_metrics(groups: list[Group], policy_version: int, fresh_from: int | None = None) -> dict[str, float]:
    """Reward and staleness statistics of the batch. ``reward/std`` is the unbiased std of the scored (non-NaN)
    rewards (0 with fewer than two); staleness = ``policy_version`` - the group's version (its oldest token's).
    Per token, over the tokens trained (:func:`trained_tokens`): ``staleness/token_mean`` and ``token_max``;
    ``staleness/masked_token_frac``: the share of the model's tokens left out as older than ``fresh_from`` (0 under
    the group unit), ``staleness/masked_groups``: the groups with any; ``staleness/version_span_max``: the most
    versions one group's tokens spread over (above 0 only when weights loaded in flight)."""
    rewards = np.concatenate([g.rewards for g in groups]).astype(np.float64)  # [B]
    real = rewards[~np.isnan(rewards)]
    staleness = np.array([policy_version - g.policy_version for g in groups], dtype=np.float64)
    trained = [trained_tokens(g, fresh_from) for g in groups]  # [n, T] each
    per_token = np.concatenate([policy_version - g.versions[m] for g, m in zip(groups, trained)])  # [tokens]
    model = [int(g.model_token_mask.sum()) for g in groups]
    masked = [n - int(m.sum()) for n, m in zip(model, trained)]
    lengths = np.concatenate([g.completion_lengths for g in groups]).astype(np.float64)  # [B]
    truncated = np.concatenate([g.truncated for g in groups])  # [B]
    ended = lengths[~truncated] if (~truncated).any() else np.zeros(1)  # TRL: 0 when none ended with EOS
    return _episode_metrics(groups) | {
        # TRL's names: completion lengths in tokens, the share cut by the length limit, and the lengths of those
        # that ended with EOS
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.mean()),
        "completions/mean_terminated_length": float(ended.mean()),
        "completions/min_terminated_length": float(ended.min()),
        "completions/max_terminated_length": float(ended.max()),
        "staleness/token_mean": float(per_token.mean()) if per_token.size else 0.0,
        "staleness/token_max": float(per_token.max()) if per_token.size else 0.0,
        "staleness/masked_token_frac": sum(masked) / max(sum(model), 1),
        "staleness/masked_groups": float(sum(n > 0 for n in masked)),
        "staleness/version_span_max": float(max(g.version_span for g in groups)),
        "reward/mean": float(real.mean()) if real.size else math.nan,
        "reward/std": float(real.std(ddof=1)) if real.size > 1 else 0.0,
        "frac_reward_zero_std": float(np.mean([not g.has_variance for g in groups])),
        "staleness/mean": float(staleness.mean()),
        "staleness/max": float(staleness.max()),
    }


def _episode_metrics(groups: list[Group]) -> dict[str, float]:
    """Multi-turn batches (groups with a loss mask): model turns per episode (runs of the model's tokens) and the
    environment's share of the completion tokens; nothing for single-turn batches."""
    if all(g.loss_mask is None for g in groups):
        return {}
    turns = tokens = model = 0
    for g in groups:
        mask = g.model_token_mask  # [n, T]
        starts = mask[:, :1].sum() + (mask[:, 1:] & ~mask[:, :-1]).sum()  # a turn starts where the mask turns on
        turns, tokens, model = turns + int(starts), tokens + int(g.completion_lengths.sum()), model + int(mask.sum())
    rows = sum(g.size for g in groups)
    return {"env/turns_per_episode": turns / rows, "env/token_frac": (tokens - model) / max(tokens, 1)}


# ----------------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------------


class PolicyGradient(NoState):
    """The GRPO family's objective on a :class:`~rlfleet.learner.trainee.Trainee` (see the module doc): ``plan``
    collates the groups and computes what the passes share (reference log-probs, the proximal policy, importance
    weights), ``loss`` one micro-batch's, ``report`` the step's metrics: the loss's (see :func:`combine_loss_metrics`),
    reward and staleness statistics of the batch, ``learner/sequences`` and ``policy_version`` after the step."""

    def __init__(self, trainee: Trainee, algorithm: AlgorithmConfig, generation: GenerationConfig,
                 token_staleness: int | None = None):
        self.trainee, self.algorithm, self.generation = trainee, algorithm, generation
        self.token_staleness = token_staleness  # replay.max_staleness under the token unit, else None
        self.temperature = generation.temperature
        self.loss_fn = make_policy_loss(algorithm)

    @torch.no_grad()
    def _detached(self, model: torch.nn.Module, micro: list[Batch]) -> list[Tensor]:
        return [self.trainee.logprobs(model, mb, self.temperature) for mb in micro]

    def fresh_from(self, version: int) -> int | None:
        """The oldest version a token may have to train at ``version`` (token staleness unit), else None."""
        return None if self.token_staleness is None else version - self.token_staleness

    def plan(self, groups: list[Group], version: int) -> Plan:
        alg, trainee = self.algorithm, self.trainee
        batch = collate(groups, trainee.tokenizer.pad_token_id, alg.mask_truncated_completions,
                        self.fresh_from(version)).to(trainee.device)
        normalizer = loss_normalizer(alg.loss_type, batch.mask, self.generation.max_completion_length)
        micro, real = zip(*batch.split(trainee.cfg.micro_batch_size, trainee.rank))  # this rank's rows
        refs = [None] * len(micro)
        if alg.beta > 0:  # the frozen reference: the reference model, or with LoRA the adapter disabled
            with trainee.as_reference() as reference:
                refs = self._detached(reference, micro)
        if alg.num_iterations == 1:
            proximals, weights = [mb.behaviour_logprobs for mb in micro], [None] * len(micro)
        else:
            proximals = self._detached(trainee.model, micro)
            capped = alg.importance_sampling_cap and alg.rollout_correction == "none"  # else the loss weighs them
            weights = [
                importance_weights(proximal, mb.behaviour_logprobs, mb.mask, alg.importance_sampling_level,
                                   alg.importance_sampling_cap) if capped else None
                for proximal, mb in zip(proximals, micro)
            ]
        return Plan([Micro(mb, is_real, {"proximal": proximal, "ref": ref, "is_weights": w})
                     for mb, is_real, proximal, ref, w in zip(micro, real, proximals, refs, weights)],
                    passes=alg.num_iterations,
                    context={"groups": groups, "version": version, "normalizer": normalizer, "rows": batch.size})

    def loss(self, plan: Plan, micro: Micro) -> Loss:
        alg, mb = self.algorithm, micro.batch
        proximal, w = micro.extra["proximal"], micro.extra["is_weights"]
        logprobs = self.trainee.logprobs(self.trainee.model, mb, self.temperature)  # [b, T]
        # the learner's policy before the step: this pass's log-probs at mu = 1, the proximal's above
        before = logprobs.detach() if alg.num_iterations == 1 else proximal
        gap = rollout_gap(before, mb.behaviour_logprobs, mb.mask)
        if alg.rollout_correction != "none":
            proximal, (w, corrected) = before, rollout_weights(
                before, mb.behaviour_logprobs, mb.mask, alg.rollout_correction, alg.rollout_correction_level,
                alg.rollout_correction_min, alg.rollout_correction_max)
            gap |= corrected
        result = self.loss_fn(logprobs, proximal, mb.advantages, mb.mask, plan.context["normalizer"],
                              ref_logprobs=micro.extra["ref"], is_weights=w)
        tokens = mb.mask.sum().item()
        return Loss(result.loss, result.metrics | gap, tokens, tokens)

    def report(self, plan: Plan, records, common: dict[str, float]) -> dict[str, float]:
        groups, version = plan.context["groups"], plan.context["version"]
        return (combine_loss_metrics(records, plan.passes) | batch_metrics(groups, version, self.fresh_from(version)) | common
                | {"learner/sequences": float(plan.context["rows"]), "policy_version": float(version + 1)})


def PolicyLearner(model_cfg: ModelConfig, algorithm_cfg: AlgorithmConfig, learner_cfg: LearnerConfig,
                  generation_cfg: GenerationConfig, seed: int = 0, rank: Rank = SINGLE,
                  token_staleness: int | None = None) -> Learner:
    """The GRPO family's learner: the policy (+ its frozen reference when beta > 0: the model loaded again, or
    with LoRA the adapter disabled) trained for :class:`PolicyGradient`."""
    reference = None
    if algorithm_cfg.beta > 0:
        reference = "adapter_off" if model_cfg.lora is not None else "load"
    trainee = Trainee(model_cfg, learner_cfg, seed, rank, reference)
    return Learner(trainee, PolicyGradient(trainee, algorithm_cfg, generation_cfg, token_staleness))
