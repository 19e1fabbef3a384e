"""Policy losses (GRPO / DAPO / Dr. GRPO / BNPO x token, GSPO, GSPO-token; CISPO, SAPO) and the sigmoid DPO loss.

Pure torch: no Ray, no vLLM, no global state. Each loss returns a :class:`LossResult` (the loss tensor to
backpropagate and detached float metrics).

Normalisation is explicit so that micro-batching does not change the gradient: the learner computes ONE normaliser
for the whole optimizer-step batch with :func:`loss_normalizer` and passes it to every micro-batch; the micro-batch
losses then sum to the full-batch loss (and their gradients to its gradient).

Notation: ``B`` sequences, ``T`` completion positions, ``m`` the mask, ``l_t = logp_t - old_t`` the log-ratio
against the behaviour policy, ``A`` the advantages, ``sg`` stop-gradient (``detach``).
References: TRL ``GRPOTrainer._compute_loss`` and ``DPOTrainer._compute_loss`` (``reference/trl-algorithms.md``
sections 1.4, 1.5, 2 and 6), GSPO (arXiv 2507.18071), CISPO (MiniMax-M1, arXiv 2506.13585), SAPO (arXiv
2511.20347), DPO (arXiv 2305.18290).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlfleet.config import GRPOConfig, ImportanceSamplingLevel, LossType


@dataclass
class LossResult:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, float]  # detached Python floats, namespaced keys


# ----------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------


def loss_normalizer(loss_type: LossType, mask: torch.Tensor, max_completion_length: int) -> float:
    """The divisor of the summed per-micro-batch loss, computed once for the whole optimizer-step batch.

    ``mask`` is ``[B_total, T]`` over every sequence of the step. With ``N = sum(mask)`` (at least 1):

    - grpo: ``B_total`` (the loss is ``sum_i [sum_t m L / max(sum_t m, 1)] / B_total``; fully masked rows count);
    - bnpo, dapo: ``N`` (``sum m L / N``). TRL's bnpo divides by the local micro-batch's tokens and dapo by the
      generation batch's tokens over all ranks; for one learner process stepping on its whole batch both are the
      step's token count, so they coincide here;
    - dr_grpo: ``B_total * max_completion_length``;
    - cispo: as dapo, sapo: as grpo (TRL's pairing, and the papers': CISPO averages over the batch's tokens, SAPO
      over each sequence's tokens, then over sequences).
    """
    return _NORMALIZERS[loss_type](mask.bool(), max_completion_length)


_NORMALIZERS: dict[str, Callable[[torch.Tensor, int], float]] = {
    "grpo": lambda valid, max_len: float(valid.shape[0]),
    "bnpo": lambda valid, max_len: float(max(int(valid.sum()), 1)),
    "dapo": lambda valid, max_len: float(max(int(valid.sum()), 1)),
    "dr_grpo": lambda valid, max_len: float(valid.shape[0] * max_len),
    "cispo": lambda valid, max_len: float(max(int(valid.sum()), 1)),
    "sapo": lambda valid, max_len: float(valid.shape[0]),
}


def _sum_of_sequence_means(per_token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """grpo numerator: ``sum_i sum_t m L / max(sum_t m, 1)``; per_token is already 0 off the mask."""
    return (per_token.sum(-1) / valid.sum(-1).clamp(min=1)).sum()


def _token_sum(per_token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bnpo / dapo / dr_grpo numerator: ``sum_{i,t} m L``."""
    return per_token.sum()


_AGGREGATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grpo": _sum_of_sequence_means,
    "bnpo": _token_sum,
    "dapo": _token_sum,
    "dr_grpo": _token_sum,
    "cispo": _token_sum,
    "sapo": _sum_of_sequence_means,
}


# ----------------------------------------------------------------------------------------------------------------
# Importance weights
# ----------------------------------------------------------------------------------------------------------------


def _token_log_weights(log_ratio: torch.Tensor, logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GRPO: ``log w_t = l_t``, shape [B, T]."""
    return log_ratio


def _sequence_log_weights(log_ratio: torch.Tensor, logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GSPO: ``log s_i = sum_t m l_t / max(sum_t m, 1)``, shape [B, 1]; a fully masked row has s_i = 1."""
    return (log_ratio.sum(-1) / valid.sum(-1).clamp(min=1)).unsqueeze(-1)


def _sequence_token_log_weights(log_ratio: torch.Tensor, logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GSPO-token: ``log s_it = logp_t - sg(logp_t) + sg(log s_i)``, shape [B, T].

    The forward value is the sequence ratio ``s_i`` at every token (so clipping is decided per sequence), and
    ``d s_it / d logp_t = s_i``: the gradient flows through the token's own ``logp_t`` only, ``s_i`` is the
    stop-gradient factor. With advantages constant within a sequence this equals GSPO in value and gradient.
    """
    seq = _sequence_log_weights(log_ratio, logprobs, valid).detach()  # [B, 1]
    own = torch.where(valid, logprobs - logprobs.detach(), 0.0)  # [B, T]  value 0, gradient 1 on valid tokens
    return own + seq


_LOG_IMPORTANCE_WEIGHTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": _token_log_weights,
    "sequence": _sequence_log_weights,
    "sequence_token": _sequence_token_log_weights,
}


# ----------------------------------------------------------------------------------------------------------------
# Rollout-train mismatch: the engine's log-probs against the learner's
# ----------------------------------------------------------------------------------------------------------------


def rollout_gap(learner_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor
                ) -> dict[str, float]:
    """How far the engine that sampled the tokens is from the learner's policy before the step, over valid tokens,
    with ``log r_t = learner_t - engine_t`` (each token's own engine log-prob, whatever weights sampled it):

    - ``rollout/kl``: KL(engine || learner) by the k3 estimator on the engine's samples, ``r - 1 - log r``
      (unbiased, non-negative per token), token mean;
    - ``rollout/ratio/min``, ``/max``: the extreme ``r_t`` (NaN without a valid token).

    Combine micro-batches as :class:`PolicyLoss`'s metrics (token mean; min / max)."""
    valid = mask.bool()
    log_r = torch.where(valid, learner_logprobs.detach() - engine_logprobs.detach(), 0.0)  # [B, T]
    r = log_r.exp()
    r_valid = r[valid]
    return {"rollout/kl": _masked_mean(r - 1 - log_r, valid),
            "rollout/ratio/min": float(r_valid.min()) if r_valid.numel() else float("nan"),
            "rollout/ratio/max": float(r_valid.max()) if r_valid.numel() else float("nan")}


def rollout_weights(learner_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                    level: str, low: float | None, high: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The rollout correction's importance weights ``rho`` ``[B, T]`` (detached; the policy loss's ``is_weights``)
    and the share of valid tokens it changed.

    With ``log r_t = learner_t - engine_t`` on valid tokens (0 elsewhere), the ratio ``r`` is, by ``level``:

        token:      r_t = exp(log r_t)
        sequence:   r_i = exp(sum_t m_t log r_t)                    (the sequence's probability ratio)
        geometric:  r_i = exp(sum_t m_t log r_t / max(sum_t m_t, 1))  (its per-token geometric mean)

    ``truncate`` (TIS): ``rho = clip(r, low, high)``, the bias of the engine's sampling corrected up to the bounds;
    ``mask`` (MIS, IcePop): ``rho = 1`` where ``low <= r <= high``, else 0 (a sequence level masks the whole
    sequence). A missing bound is no bound. ``rollout/truncated_frac`` / ``rollout/masked_frac``: the share of valid
    tokens whose ratio left the band (a sequence's tokens count with it)."""
    valid = mask.bool()
    log_r = torch.where(valid, learner_logprobs.detach() - engine_logprobs.detach(), 0.0)  # [B, T]
    if level == "sequence":
        log_r = log_r.sum(-1, keepdim=True)  # [B, 1]
    elif level == "geometric":
        log_r = log_r.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    r = log_r.exp().expand(valid.shape)  # [B, T]
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    outside = (r < lo) | (r > hi)  # [B, T]
    if mode == "truncate":
        rho, name = r.clamp(min=low, max=high), "rollout/truncated_frac"
    elif mode == "mask":
        rho, name = (~outside).to(r.dtype), "rollout/masked_frac"
    else:
        raise ValueError(f"rollout_correction: {mode!r} is not 'truncate' or 'mask'")
    return torch.where(valid, rho, 0.0), {name: _masked_mean(outside.float(), valid)}


# ----------------------------------------------------------------------------------------------------------------
# Clipped policy loss
# ----------------------------------------------------------------------------------------------------------------


def _broadcastable(x: torch.Tensor) -> torch.Tensor:
    """Per-sequence values [B] -> [B, 1]; per-token values [B, T] unchanged."""
    return x.unsqueeze(-1) if x.dim() == 1 else x


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> float:
    """Token-weighted mean of ``x`` (broadcast to [B, T]) over valid tokens; 0 when there is none."""
    x = x.detach().expand(valid.shape)
    return float(torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1))


# ----------------------------------------------------------------------------------------------------------------
# Surrogates: per-token loss terms (before aggregation) and the tokens each one clips
# ----------------------------------------------------------------------------------------------------------------
# Each takes the bound loss, the importance weight w ([B, T], or [B, 1] at sequence level), the advantages A and the
# log-probs logp ([B, T], both 0 off the mask) and returns (L [B, T], clipped low [B, T], clipped high [B, T]).


def _clipped_surrogate(loss: PolicyLoss, w: torch.Tensor, adv: torch.Tensor, logp: torch.Tensor):
    """PPO's, with DAPO's asymmetric range and the optional ``delta`` cap::

        L_t = -min( min(w, delta) * A,  clip(w, 1 - epsilon_low, 1 + epsilon_high) * A )

    d L_t / d logp_t = -w A where the unclipped branch is the minimum, 0 where the clip binds (``w < 1 - eps_low``
    with ``A < 0``, or ``w > 1 + eps_high`` with ``A > 0``) or ``delta`` caps ``w``."""
    w_clipped = w.clamp(1 - loss.epsilon_low, 1 + loss.epsilon_high)
    w_capped = w if loss.delta is None else w.clamp(max=loss.delta)
    policy = -torch.minimum(w_capped * adv, w_clipped * adv)
    return policy, (w < 1 - loss.epsilon_low) & (adv < 0), (w > 1 + loss.epsilon_high) & (adv > 0)


def _cispo_surrogate(loss: PolicyLoss, w: torch.Tensor, adv: torch.Tensor, logp: torch.Tensor):
    """CISPO (MiniMax-M1, eq. 4): the REINFORCE term weighted by the clipped importance weight, which is detached::

        L_t = -sg(min(w, epsilon_high)) * A * logp_t,      d L_t / d logp_t = -min(w, epsilon_high) * A

    so every token keeps its gradient (PPO's clip zeroes it), scaled down where the weight exceeds the cap. The paper
    writes the clip as ``clip(w, 1 - eps_low, 1 + eps_high)`` with no effective lower bound; ``epsilon_high`` is the
    upper bound itself, as in TRL (ScaleRL's eps_max = 5). The value of L is no objective (it carries logp), only
    its gradient is. Clipped high: every token whose weight the cap lowered, whatever A's sign (the cap scales both;
    TRL's ``cispo_clip_ratio`` counts those with A > 0 only); nothing is clipped low."""
    capped = w > loss.epsilon_high
    policy = -w.clamp(max=loss.epsilon_high).detach() * adv * logp
    return policy, torch.zeros_like(capped), capped


def _sapo_surrogate(loss: PolicyLoss, w: torch.Tensor, adv: torch.Tensor, logp: torch.Tensor):
    """SAPO (arXiv 2511.20347, eq. 5-7): a smooth gate in place of the hard clip, with a temperature per sign of A::

        L_t = -(4 / tau) * sigmoid(tau (w - 1)) * A,   tau = sapo_temperature_pos if A > 0 else sapo_temperature_neg
        d L_t / d logp_t = -4 p (1 - p) * w * A,       p = sigmoid(tau (w - 1))

    At w = 1 the gradient is -A (the policy gradient, as unclipped GRPO's); it decays smoothly as w leaves 1, faster
    for negative advantages (tau_neg > tau_pos), instead of dropping to 0 at a boundary. Nothing is hard-clipped."""
    tau = torch.where(adv > 0, loss.sapo_temperature_pos, loss.sapo_temperature_neg)  # [B, T]
    policy = -(4 / tau) * torch.sigmoid(tau * (w - 1)) * adv
    none = torch.zeros_like(policy, dtype=torch.bool)
    return policy, none, none


_SURROGATES: dict[str, Callable] = {"cispo": _cispo_surrogate, "sapo": _sapo_surrogate}  # others: the clipped one


@dataclass(frozen=True)
class PolicyLoss:
    """The clipped surrogate loss with its knobs bound; build it with :func:`make_policy_loss`.

    Per valid token (``w`` the importance weight of ``importance_sampling_level``, ``A`` the advantage)::

        L_t = -min( min(w, delta) * A,  clip(w, 1 - epsilon_low, 1 + epsilon_high) * A ) * rho  +  beta * KL_t
        KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (k3 estimator, gradient through logp only)

    ``min(w, delta)`` only when ``delta`` is set; ``rho`` are the optional truncated importance-sampling weights
    (``is_weights``, detached). ``loss_type`` cispo and sapo replace the clipped term by their own
    (:func:`_cispo_surrogate`, :func:`_sapo_surrogate`), with the same weights ``w``, ``rho`` and KL. The loss is ``aggregate(L) / normalizer``: for grpo the sum over sequences of the
    per-sequence token mean, otherwise the token sum (see :func:`loss_normalizer`).

    ``mask`` [B, T] marks the tokens that train: it must already exclude padding and, when
    ``mask_truncated_completions`` is on, whole truncated completions; building it is the caller's job.
    Positions off the mask may hold anything (even NaN): they get zero loss and zero gradient.

    Metrics, all detached floats for this micro-batch (combine across micro-batches as noted):

    - ``loss/policy``: the policy term's share of ``loss`` (already normalised: sum across micro-batches);
    - ``loss/kl`` (when ``ref_logprobs`` is given): mean ``KL_t`` over valid tokens, without beta;
    - ``clip/low_frac``: share of valid tokens with ``w < 1 - epsilon_low`` and ``A < 0``;
      ``clip/high_frac``: ``w > 1 + epsilon_high`` and ``A > 0``; ``clip/frac``: either (the tokens whose gradient
      the clip removes; the ``delta`` cap is not counted). cispo: the tokens whose weight its cap lowered (high);
      sapo: none (its gate is smooth);
    - ``ratio/mean``, ``ratio/min``, ``ratio/max``: of ``w`` over valid tokens (a sequence ratio counts once per
      token); min/max are NaN when there is no valid token;
    - ``is_weight/mean`` (when ``is_weights`` is given): mean ``rho`` over valid tokens.

    All means are token-weighted over valid tokens: combine micro-batches weighting by ``mask.sum()``; combine
    min/max with nanmin/nanmax.
    """

    loss_type: LossType
    importance_sampling_level: ImportanceSamplingLevel
    epsilon_low: float
    epsilon_high: float
    delta: float | None = None
    beta: float = 0.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    _aggregate: Callable = field(init=False, repr=False, compare=False)
    _surrogate: Callable = field(init=False, repr=False, compare=False)
    _log_weights: Callable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.loss_type not in _AGGREGATORS:
            raise ValueError(f"loss_type: {self.loss_type!r} is not one of {sorted(_AGGREGATORS)}")
        if self.importance_sampling_level not in _LOG_IMPORTANCE_WEIGHTS:
            raise ValueError(
                f"importance_sampling_level: {self.importance_sampling_level!r} is not one of "
                f"{sorted(_LOG_IMPORTANCE_WEIGHTS)}"
            )
        object.__setattr__(self, "_aggregate", _AGGREGATORS[self.loss_type])
        object.__setattr__(self, "_log_weights", _LOG_IMPORTANCE_WEIGHTS[self.importance_sampling_level])
        object.__setattr__(self, "_surrogate", _SURROGATES.get(self.loss_type, _clipped_surrogate))

    def __call__(
        self,
        logprobs: torch.Tensor,  # [B, T] current policy, differentiable
        proximal_logprobs: torch.Tensor,  # [B, T] the ratio's base: behaviour (mu == 1) or pre-step learner policy
        advantages: torch.Tensor,  # [B] or [B, T]
        mask: torch.Tensor,  # [B, T] bool or 0/1
        normalizer: float,  # from loss_normalizer over the whole optimizer-step batch
        ref_logprobs: torch.Tensor | None = None,  # [B, T] reference policy (needed when beta > 0)
        is_weights: torch.Tensor | None = None,  # [B, T] or [B] truncated IS weights, detached here
    ) -> LossResult:
        if logprobs.shape != proximal_logprobs.shape or logprobs.shape != mask.shape:
            raise ValueError(
                f"logprobs {tuple(logprobs.shape)}, proximal_logprobs {tuple(proximal_logprobs.shape)} and mask "
                f"{tuple(mask.shape)} must have the same [B, T] shape"
            )
        if self.beta > 0 and ref_logprobs is None:
            raise ValueError(f"beta={self.beta} > 0 needs ref_logprobs (the reference model's log-probs)")
        if not normalizer > 0:
            raise ValueError(f"normalizer must be positive, got {normalizer}")
        valid = mask.bool()  # [B, T]
        # Every [B, T] input is zeroed off the mask first (A = 0 there zeroes the policy term), so garbage off the
        # mask (even NaN) reaches neither the loss nor the gradient.
        adv = torch.where(valid, _broadcastable(advantages).detach(), 0.0)  # [B, T]
        log_ratio = torch.where(valid, logprobs - proximal_logprobs.detach(), 0.0)  # [B, T]

        w = torch.exp(self._log_weights(log_ratio, logprobs, valid))  # [B, T] or [B, 1]
        logp = torch.where(valid, logprobs, 0.0)  # [B, T]  (CISPO's term carries it)
        policy, low, high = self._surrogate(self, w, adv, logp)  # [B, T] each
        if is_weights is not None:
            rho = torch.where(valid, _broadcastable(is_weights).detach(), 0.0)  # [B, T]
            policy = policy * rho  # [B, T]
        policy_loss = self._aggregate(policy, valid) / normalizer

        metrics: dict[str, float] = {"loss/policy": float(policy_loss.detach())}
        loss = policy_loss
        if ref_logprobs is not None:
            d = torch.where(valid, ref_logprobs.detach() - logprobs, 0.0)  # [B, T]
            kl = torch.exp(d) - d - 1  # [B, T], 0 off the mask
            loss = loss + self.beta * self._aggregate(kl, valid) / normalizer
            metrics["loss/kl"] = _masked_mean(kl, valid)

        w_valid = w.detach().expand(valid.shape)[valid]  # [N]
        metrics |= {
            "clip/low_frac": _masked_mean(low.float(), valid),
            "clip/high_frac": _masked_mean(high.float(), valid),
            "clip/frac": _masked_mean((low | high).float(), valid),
            "ratio/mean": _masked_mean(w, valid),
            "ratio/min": float(w_valid.min()) if w_valid.numel() else float("nan"),
            "ratio/max": float(w_valid.max()) if w_valid.numel() else float("nan"),
        }
        if is_weights is not None:
            metrics["is_weight/mean"] = _masked_mean(rho, valid)
        return LossResult(loss=loss, metrics=metrics)


def make_policy_loss(cfg: GRPOConfig) -> PolicyLoss:
    """Bind the loss variant and its knobs from the algorithm config, once."""
    return PolicyLoss(
        loss_type=cfg.loss_type,
        importance_sampling_level=cfg.importance_sampling_level,
        epsilon_low=cfg.epsilon,
        epsilon_high=cfg.clip_high,
        delta=cfg.delta,
        beta=cfg.beta,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
    )


# ----------------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------------


def dpo_loss(
    chosen_logps: torch.Tensor,  # [B] summed completion log-probs under the policy
    rejected_logps: torch.Tensor,  # [B]
    ref_chosen_logps: torch.Tensor,  # [B] same under the reference model
    ref_rejected_logps: torch.Tensor,  # [B]
    beta: float,
    normalizer: float | None = None,
) -> LossResult:
    """Sigmoid DPO: ``loss = sum_i -log sigmoid(beta * Delta_i) / normalizer`` (default normaliser: B).

    ``Delta_i = (logp_c - ref_c) - (logp_r - ref_r)``. Pass the optimizer-step batch size as ``normalizer`` to
    split a batch into micro-batches. Label smoothing (cDPO) is not supported: TRL ignores it for sigmoid since
    v0.29. Metrics are means over this micro-batch: ``rewards/chosen = beta (logp_c - ref_c)``,
    ``rewards/rejected``, ``rewards/margins`` (chosen - rejected), ``rewards/accuracies`` (share with
    chosen > rejected).
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps.detach())  # [B]
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps.detach())  # [B]
    margins = chosen_rewards - rejected_rewards  # [B] = beta * Delta
    norm = float(chosen_logps.shape[0]) if normalizer is None else normalizer
    loss = -F.logsigmoid(margins).sum() / norm
    metrics = {
        "rewards/chosen": float(chosen_rewards.detach().mean()),
        "rewards/rejected": float(rejected_rewards.detach().mean()),
        "rewards/margins": float(margins.detach().mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
    }
    return LossResult(loss=loss, metrics=metrics)
