"""Wire types passed between actors. Compact to pickle: numpy arrays, no lists of Python floats."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Group:
    """The completions sampled for one prompt, scored, filtered (GFPO) and with advantages.

    ``n`` is the number of completions kept (``num_generations``, or ``num_remains_in_group`` under GFPO) and
    ``T`` the longest kept completion. Completion arrays are right-padded; ``completion_lengths`` gives the real
    lengths. The behaviour log-probabilities ``old_logprobs`` are those of the sampled tokens under the weights of
    ``policy_version``, computed on temperature-scaled logits as the learner does.
    """

    prompt_id: str  # stable id of the prompt record (dataset index or id column)
    prompt_ids: np.ndarray  # int32 [P]  prompt token ids (chat template applied)
    completion_ids: np.ndarray  # int32 [n, T]  right-padded with 0
    completion_lengths: np.ndarray  # int32 [n]
    old_logprobs: np.ndarray  # float32 [n, T]  behaviour log-probs of the sampled tokens, 0 on padding
    rewards: np.ndarray  # float32 [n]  weighted reward sum; NaN when no reward function scored the row
    advantages: np.ndarray  # float32 [n]
    truncated: np.ndarray  # bool [n]  hit max_completion_length without EOS
    policy_version: int  # version of the weights that sampled it
    reward_std: float = 0.0  # unbiased std of the kept rewards (0 when zero-variance)
    meta: dict = field(default_factory=dict)  # small extras for logging (e.g. one decoded completion)

    def __post_init__(self) -> None:
        n = len(self.completion_lengths)
        if self.completion_ids.shape[0] != n or self.old_logprobs.shape != self.completion_ids.shape:
            raise ValueError(
                f"Group {self.prompt_id}: completion_ids {self.completion_ids.shape}, old_logprobs "
                f"{self.old_logprobs.shape} and completion_lengths ({n},) disagree"
            )
        if self.rewards.shape != (n,) or self.advantages.shape != (n,) or self.truncated.shape != (n,):
            raise ValueError(f"Group {self.prompt_id}: rewards/advantages/truncated must have shape ({n},)")

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
    def completion_token_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.completion_ids, self.completion_lengths)]
