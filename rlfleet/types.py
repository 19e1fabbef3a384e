"""Wire types passed between actors. Compact to pickle: numpy arrays, no lists of Python floats."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Group:
    """The completions sampled for one prompt, scored, filtered (GFPO) and with advantages.

    ``n`` is the number of completions kept (``num_generations``, or ``num_remains_in_group`` under GFPO) and
    ``T`` the longest kept completion. Completion arrays are right-padded; ``completion_lengths`` gives the real
    lengths. In a multi-turn episode the "completion" is everything after the prompt: the model's turns and the
    environment's messages between them, as token ids; ``loss_mask`` marks the model's tokens (1) against the
    environment's (0), and None means every token is the model's (single-turn). The behaviour log-probabilities
    ``behaviour_logprobs`` are those of the sampled tokens under the weights that sampled each, computed on
    temperature-scaled logits as the learner does (0 on the environment's tokens).

    Continuous generation loads new weights while completions are in flight, so one completion may hold tokens of
    several policy versions: ``token_versions`` gives each token's, and ``policy_version`` is then the oldest (the
    one the staleness bound is about). None: every token was sampled at ``policy_version``.
    """

    prompt_id: str  # stable id of the prompt record (dataset index or id column)
    prompt_token_ids: np.ndarray  # int32 [P]  prompt token ids (chat template applied)
    completion_ids: np.ndarray  # int32 [n, T]  right-padded with 0
    completion_lengths: np.ndarray  # int32 [n]
    behaviour_logprobs: np.ndarray  # float32 [n, T]  behaviour log-probs of the sampled tokens, 0 on padding
    rewards: np.ndarray  # float32 [n]  weighted reward sum; NaN when no reward function scored the row
    advantages: np.ndarray  # float32 [n]
    truncated: np.ndarray  # bool [n]  hit max_completion_length without EOS
    policy_version: int  # version of the weights that sampled its oldest token
    reward_std: float = 0.0  # unbiased std of the kept rewards (0 when zero-variance)
    meta: dict = field(default_factory=dict)  # small extras for logging (e.g. one decoded completion)
    loss_mask: np.ndarray | None = None  # bool [n, T]  1 on the model's tokens; None: all of them (0 on padding)
    token_versions: np.ndarray | None = None  # int32 [n, T]  policy version of each token; None: policy_version

    def __post_init__(self) -> None:
        n = len(self.completion_lengths)
        if self.completion_ids.shape[0] != n or self.behaviour_logprobs.shape != self.completion_ids.shape:
            raise ValueError(
                f"Group {self.prompt_id}: completion_ids {self.completion_ids.shape}, behaviour_logprobs "
                f"{self.behaviour_logprobs.shape} and completion_lengths ({n},) disagree"
            )
        if self.rewards.shape != (n,) or self.advantages.shape != (n,) or self.truncated.shape != (n,):
            raise ValueError(f"Group {self.prompt_id}: rewards/advantages/truncated must have shape ({n},)")
        if self.loss_mask is not None and self.loss_mask.shape != self.completion_ids.shape:
            raise ValueError(f"Group {self.prompt_id}: loss_mask {self.loss_mask.shape} and completion_ids "
                             f"{self.completion_ids.shape} disagree")
        if self.token_versions is not None and self.token_versions.shape != self.completion_ids.shape:
            raise ValueError(f"Group {self.prompt_id}: token_versions {self.token_versions.shape} and completion_ids "
                             f"{self.completion_ids.shape} disagree")

    @property
    def size(self) -> int:
        return int(self.completion_lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.completion_lengths.sum())

    @property
    def has_variance(self) -> bool:
        return self.reward_std > 0.0

    @property
    def score(self) -> float:
        """Reservoir priority: sum_j |A_j| * std (TRL's grpo_with_replay_buffer)."""
        return float(np.abs(self.advantages).sum() * self.reward_std)

    @property
    def model_token_mask(self) -> np.ndarray:
        """bool ``[n, T]``: the model's sampled tokens (the loss mask within each completion's length)."""
        within = np.arange(self.completion_ids.shape[1])[None, :] < self.completion_lengths[:, None]  # [n, T]
        return within if self.loss_mask is None else within & self.loss_mask.astype(bool)

    @property
    def versions(self) -> np.ndarray:
        """int64 ``[n, T]``: each token's policy version (``policy_version`` where ``token_versions`` is None)."""
        if self.token_versions is None:
            return np.full(self.completion_ids.shape, self.policy_version, dtype=np.int64)
        return self.token_versions.astype(np.int64)

    @property
    def newest_version(self) -> int:
        """The policy version of the group's newest model token (``policy_version`` when none or one version)."""
        mask = self.model_token_mask
        if self.token_versions is None or not mask.any():
            return self.policy_version
        return int(self.token_versions[mask].max())

    @property
    def version_span(self) -> int:
        """Newest minus oldest policy version among the model's tokens (0: one version sampled it all)."""
        mask = self.model_token_mask
        if self.token_versions is None or not mask.any():
            return 0
        return int(self.token_versions[mask].max()) - int(self.token_versions[mask].min())

    @property
    def completion_token_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.completion_ids, self.completion_lengths)]


# ---------------------------------------------------------------------------------------------------------------
# Serialization of groups into flat numeric arrays + JSON (checkpoints load without unpickling)
# ---------------------------------------------------------------------------------------------------------------

def _json_roundtrips(value) -> bool:
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


def groups_to_arrays(groups: list[Group], prefix: str) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Concatenate groups of different shapes into flat arrays keyed ``prefix + name``, plus one JSON dict per group.

    Arrays (k groups; P_i prompt lengths, [n_i, T_i] completion shapes; offsets are the cumulative sums):
    ``prompt_lengths`` int64 [k], ``prompt_token_ids`` int32 [sum P_i], ``completion_shapes`` int64 [k, 2],
    ``completion_ids`` int32 and ``behaviour_logprobs`` float32 [sum n_i T_i] (row-major), ``completion_lengths`` int32,
    ``rewards`` and ``advantages`` float32, ``truncated`` bool [sum n_i], ``loss_mask`` bool [sum n_i T_i] (all 1 for
    a single-turn group), ``token_versions`` int64 [sum n_i T_i] (``policy_version`` throughout for a group sampled at
    one version). Arrays are cast to these wire dtypes.
    Meta: prompt_id, policy_version, reward_std and the entries of ``Group.meta`` that survive a JSON round trip
    unchanged (others, e.g. numpy values, are left out).
    """

    def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate([np.zeros(0, dtype)] + [np.asarray(p, dtype=dtype).reshape(-1) for p in parts])

    arrays = {
        "prompt_lengths": np.array([len(g.prompt_token_ids) for g in groups], dtype=np.int64),
        "prompt_token_ids": cat([g.prompt_token_ids for g in groups], np.int32),
        "completion_shapes": np.array([g.completion_ids.shape for g in groups], dtype=np.int64).reshape(-1, 2),
        "completion_ids": cat([g.completion_ids for g in groups], np.int32),
        "behaviour_logprobs": cat([g.behaviour_logprobs for g in groups], np.float32),
        "completion_lengths": cat([g.completion_lengths for g in groups], np.int32),
        "rewards": cat([g.rewards for g in groups], np.float32),
        "advantages": cat([g.advantages for g in groups], np.float32),
        "truncated": cat([g.truncated for g in groups], np.bool_),
        "loss_mask": cat([g.model_token_mask for g in groups], np.bool_),
        "token_versions": cat([g.versions for g in groups], np.int64),
    }
    metas = [
        {
            "prompt_id": g.prompt_id,
            "policy_version": int(g.policy_version),
            "reward_std": float(g.reward_std),
            "meta": {k: v for k, v in g.meta.items() if isinstance(k, str) and _json_roundtrips(v)},
        }
        for g in groups
    ]
    return {prefix + name: a for name, a in arrays.items()}, metas


def groups_from_arrays(arrays: dict[str, np.ndarray], metas: list[dict], prefix: str) -> list[Group]:
    """Inverse of :func:`groups_to_arrays`."""
    names = ("prompt_lengths", "prompt_token_ids", "completion_shapes", "completion_ids", "behaviour_logprobs")
    names += ("completion_lengths", "rewards", "advantages", "truncated")
    if prefix + "behaviour_logprobs" not in arrays and prefix + "old_logprobs" in arrays:  # written before the rename
        arrays = {**arrays, prefix + "behaviour_logprobs": arrays[prefix + "old_logprobs"]}
    if prefix + "prompt_token_ids" not in arrays and prefix + "prompt_ids" in arrays:  # written before the rename
        arrays = {**arrays, prefix + "prompt_token_ids": arrays[prefix + "prompt_ids"]}
    a = {name: np.asarray(arrays[prefix + name]) for name in names}
    loss_masks = arrays.get(prefix + "loss_mask")  # absent in states written before multi-turn episodes
    versions = arrays.get(prefix + "token_versions")  # absent in states written before continuous generation
    if len(a["prompt_lengths"]) != len(metas):
        raise ValueError(f"groups_from_arrays: {len(a['prompt_lengths'])} groups in arrays, {len(metas)} metas")
    groups = []
    p0 = c0 = r0 = 0  # offsets into the prompt, completion-token and row arrays
    for i, m in enumerate(metas):
        n, t = (int(x) for x in a["completion_shapes"][i])
        p1, c1, r1 = p0 + int(a["prompt_lengths"][i]), c0 + n * t, r0 + n
        lengths = a["completion_lengths"][r0:r1]
        loss_mask = None  # single-turn: every token within the length is the model's
        if loss_masks is not None:
            stored = np.asarray(loss_masks[c0:c1], dtype=bool).reshape(n, t)  # [n, T]
            if not np.array_equal(stored, np.arange(t)[None, :] < lengths[:, None]):
                loss_mask = stored.copy()
        token_versions = None  # sampled at one version: policy_version
        if versions is not None:
            stored = np.asarray(versions[c0:c1]).reshape(n, t)  # [n, T]
            if (stored != int(m["policy_version"])).any():
                token_versions = stored.astype(np.int32)
        group = Group(
            prompt_id=m["prompt_id"],
            prompt_token_ids=a["prompt_token_ids"][p0:p1].copy(),  # [P]
            completion_ids=a["completion_ids"][c0:c1].reshape(n, t).copy(),  # [n, T]
            completion_lengths=lengths.copy(),  # [n]
            behaviour_logprobs=a["behaviour_logprobs"][c0:c1].reshape(n, t).copy(),  # [n, T]
            rewards=a["rewards"][r0:r1].copy(),
            advantages=a["advantages"][r0:r1].copy(),
            truncated=a["truncated"][r0:r1].copy(),
            policy_version=int(m["policy_version"]),
            reward_std=float(m["reward_std"]),
            meta=dict(m["meta"]),
            loss_mask=loss_mask,
            token_versions=token_versions,
        )
        groups.append(group)
        p0, c0, r0 = p1, c1, r1
    return groups
