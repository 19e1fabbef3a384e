"""Rewards -> advantages, and GFPO group filtering: pure numpy, no Ray, no vLLM.

The generator calls these on one request's groups, laid out as ``[num_groups, n]`` (a group is the ``n``
completions of one prompt; ``n = num_generations`` before GFPO filtering, ``num_remains_in_group`` after).

- :func:`combine_rewards`: the weighted sum of several reward functions' outputs (TRL ``sum_then_normalize``).
- :func:`group_advantages`: GRPO's group-relative advantages ``A = (r - mean_g) / (std + 1e-4)``.
- :func:`select_top_k` and the built-in group filters: GFPO (arXiv 2508.09726) keeps the ``k`` completions of each
  group with the highest filter score; advantages are then computed on the kept rows only.

References: TRL ``GRPOTrainer._generate_and_score_completions`` and ``trl/experimental/gfpo`` (see
``reference/trl-algorithms.md`` sections 1.3 and 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ADVANTAGE_EPS = 1e-4  # TRL: A = (r - mu) / (std + 1e-4)
ZERO_STD_ATOL = 1e-8  # TRL flags zero-std groups with torch.isclose(std, 0), whose default atol is 1e-8


def combine_rewards(per_func: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
    """Weighted sum of reward functions: ``r_j = nansum_k w_k * r_kj``.

    ``per_func`` is ``[F, N]`` with NaN where function ``k`` returned None for row ``j``. A row that every function
    left unscored is NaN ("unscorable"): it is excluded from the group statistics and gets advantage 0 (TRL
    semantics; a plain nansum would score it 0 and bias the group baseline). ``weights`` None means all 1.
    Returns float32 ``[N]``.
    """
    per_func = np.asarray(per_func, dtype=np.float64)  # [F, N]
    if per_func.ndim != 2:
        raise ValueError(f"combine_rewards: per_func must be [num_funcs, num_rows], got shape {per_func.shape}")
    w = np.ones(per_func.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)  # [F]
    if w.shape != (per_func.shape[0],):
        raise ValueError(
            f"combine_rewards: {len(w)} weights for {per_func.shape[0]} reward functions; give one weight per function"
        )
    total = np.nansum(w[:, None] * per_func, axis=0)  # [N]
    total[np.isnan(per_func).all(axis=0)] = np.nan
    return total.astype(np.float32)


@dataclass(frozen=True)
class Advantages:
    """Result of :func:`group_advantages`."""

    advantages: np.ndarray  # float32 [num_groups, n]; 0 for unscorable rows and zero-std groups
    std: np.ndarray  # float32 [num_groups]  unbiased per-group std of the scorable rewards; 0 where zero_std
    zero_std: np.ndarray  # bool [num_groups]  no usable reward variance in the group


def _nanmean(x: np.ndarray, axis: int | None) -> np.ndarray:
    """``nanmean`` keeping the reduced axis; NaN (and no RuntimeWarning) for all-NaN slices."""
    count = (~np.isnan(x)).sum(axis=axis, keepdims=True)
    total = np.nansum(x, axis=axis, keepdims=True)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _nanstd_unbiased(x: np.ndarray, axis: int | None) -> np.ndarray:
    """Bessel-corrected std ignoring NaN; NaN where fewer than 2 values are not NaN (as TRL's ``nanstd``)."""
    count = (~np.isnan(x)).sum(axis=axis)
    mean = _nanmean(x, axis)
    ss = np.nansum((x - mean) ** 2, axis=axis)
    return np.where(count > 1, np.sqrt(ss / np.maximum(count - 1, 1)), np.nan)


def group_advantages(rewards: np.ndarray, scale_rewards: str) -> Advantages:
    """GRPO group-relative advantages (TRL ``sum_then_normalize``).

    With ``r`` of shape ``[G_num, n]`` (NaN = unscorable)::

        mu_g  = nanmean_j r_gj
        std_g = sqrt( sum_j (r_gj - mu_g)^2 / (n_g - 1) )      n_g = scorable rows of group g (Bessel-corrected)
        A_gj  = (r_gj - mu_g) / (s + 1e-4)   with s = std_g ("group"), the unbiased nanstd over all rows ("batch"),
              = (r_gj - mu_g)                ("none")

    then NaN -> 0 (unscorable rows, and every row when ``s`` is undefined). A group is ``zero_std`` when ``std_g``
    is undefined (fewer than 2 scorable rows) or ``|std_g| <= 1e-8`` (TRL's ``isclose``); its advantages are
    exactly 0 and its reported std is 0. ``std``/``zero_std`` are always the per-group values, also in "batch"
    mode: they drive variance detection and the replay score ``sum|A| * std``.
    """
    r = np.asarray(rewards, dtype=np.float64)  # [G_num, n]
    if r.ndim != 2:
        raise ValueError(f"group_advantages: rewards must be [num_groups, n], got shape {r.shape}")
    mu = _nanmean(r, axis=1)  # [G_num, 1]
    std_group = _nanstd_unbiased(r, axis=1)  # [G_num]
    zero_std = ~(std_group > ZERO_STD_ATOL)  # NaN std compares False -> zero_std
    centred = r - mu  # [G_num, n]
    if scale_rewards == "group":
        adv = centred / (std_group[:, None] + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        adv = centred / (_nanstd_unbiased(r, axis=None) + ADVANTAGE_EPS)
    elif scale_rewards == "none":
        adv = centred
    else:
        raise ValueError(f"scale_rewards: {scale_rewards!r} is not one of 'group', 'batch', 'none'")
    adv = np.nan_to_num(adv, nan=0.0)
    adv[zero_std] = 0.0
    std = np.where(zero_std, 0.0, std_group)
    return Advantages(advantages=adv.astype(np.float32), std=std.astype(np.float32), zero_std=zero_std)


def select_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """GFPO selection: indices ``[num_groups, k]`` of the ``k`` highest scores per row, best first.

    Ties go to the lower index (a stable sort), NaN scores rank last (after -inf). TRL uses ``torch.topk``, whose
    tie order is unspecified; the kept *set* agrees with it whenever scores are distinct.
    """
    s = np.asarray(scores, dtype=np.float64)  # [G_num, G]
    if s.ndim != 2:
        raise ValueError(f"select_top_k: scores must be [num_groups, G], got shape {s.shape}")
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"select_top_k: k={k} must be between 1 and the group size {s.shape[1]}")
    # numpy sorts NaN last; sorting -s ascending puts the highest score first and -inf after every finite score.
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def shortest(
    group_completions: list[list[Any]],
    group_rewards: list[list[float]],
    *,
    completion_lengths: Sequence[Sequence[int]] | np.ndarray,
    **kwargs: Any,
) -> list[list[float]]:
    """GFPO "shortest k": score = -length in tokens, so the shortest completions are kept.

    ``completion_lengths`` is ``[num_groups, G]``, laid out like ``group_completions``.
    """
    return (-np.asarray(completion_lengths, dtype=np.float64)).tolist()


def token_efficiency(
    group_completions: list[list[Any]],
    group_rewards: list[list[float]],
    *,
    completion_lengths: Sequence[Sequence[int]] | np.ndarray,
    **kwargs: Any,
) -> list[list[float]]:
    """GFPO token efficiency: score = reward / length (tokens, at least 1); an unscorable (NaN) reward scores -inf."""
    r = np.asarray(group_rewards, dtype=np.float64)  # [G_num, G]
    length = np.maximum(np.asarray(completion_lengths, dtype=np.float64), 1.0)  # [G_num, G]
    return np.where(np.isnan(r), -np.inf, r / length).tolist()


BUILTIN_GROUP_FILTERS: dict[str, Callable[..., list[list[float]]]] = {
    "shortest": shortest,
    "token_efficiency": token_efficiency,
}


