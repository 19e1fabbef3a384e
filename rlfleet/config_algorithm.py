"""The ``algorithm`` section: a discriminated union on ``name``.

``grpo`` (the default when a file names none) is the group-relative policy-gradient family (GRPO, DAPO, Dr. GRPO,
BNPO, GSPO, GFPO, CISPO, SAPO), chosen by its own fields; ``online_dpo`` trains DPO on preference pairs formed from
each scored group. What both read (reward functions and their limits, the GFPO group filter, the environment: None
under online DPO, the advantages' scaling the generators compute and the replay reservoir ranks by) is in
:class:`AlgorithmBase`; the policy-gradient knobs are :class:`GRPOConfig`'s only, so a job file that sets one under
``name: online_dpo`` is refused naming the field. Online DPO's own knobs stay in the ``dpo`` section (``dpo.beta``,
``dpo.bema``, ``dpo.pairs``, ``dpo.min_reward_margin``, ``dpo.max_length``), the DPO objective's, which `rlfleet dpo`
reads too. Import these names from :mod:`rlfleet.config`."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator

from rlfleet.config_sections import Section

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
ImportanceSamplingLevel = Literal["token", "sequence", "sequence_token"]
RolloutCorrection = Literal["none", "truncate", "mask"]
RolloutCorrectionLevel = Literal["token", "sequence", "geometric"]


class AlgorithmBase(Section):
    """The fields every algorithm reads: how the generators score, filter and rank a group."""

    name: Literal["grpo", "online_dpo"] = Field(description="The variant: each narrows it to its own name.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantages (r - group mean) divided by the group's reward std, the batch's, or not "
        "at all (TRL's names). The generators compute them for every group; GRPO trains on them and the replay "
        "reservoir (replay.replay_buffer_size) ranks groups by them under either algorithm.")
    reward_funcs: list[str] = Field(
        default_factory=list,
        description="Reward functions: built-in names or 'package.module:function'. Empty: the task's own.",
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward function; None = all 1.")
    num_remains_in_group: int | None = Field(
        None, ge=2, description="GFPO: completions kept per group (2 <= k < num_generations; the std of one reward "
        "is undefined); None = no filtering."
    )
    max_reward_error_frac: float = Field(
        0.5, ge=0, le=1,
        description="Stop the run when reward or filter functions fail (raise, wrong length, NaN/inf) on more than "
        "this share of the groups generated so far; below it, failing groups are dropped and counted.",
    )
    reward_timeout_s: float = Field(
        120.0, gt=0, description="Longest one reward call may run (a synchronous function's call covers a request's "
        "groups, an async function's one group); past it the call's groups are dropped and counted in errors/reward "
        "and errors/reward_timeout. Reward functions run in a worker process beside each generator.")
    reward_concurrency: int = Field(
        8, ge=1, le=1024, description="Reward calls one generator's worker runs at once: async functions (remote "
        "judges) are awaited per group, this many side by side; synchronous ones run in this many threads.")
    group_filter_func: str | None = Field(
        None, description="GFPO scorer: 'shortest', 'token_efficiency' or 'package.module:function'."
    )
    environment: str | None = Field(
        None, description="Multi-turn episodes: 'scripted_user', 'calculator' or 'package.module:Class' (see "
        "rlfleet.environments); None = one completion per sample."
    )
    environment_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the "
                                               "environment's class.")

    @property
    def kl_coef(self) -> float:
        """The coefficient of the loss's KL penalty to a reference model; 0: the loss has no such term."""
        return 0.0

    @property
    def keeps_reference(self) -> bool:
        """Whether the learner holds a reference model beside the policy (the memory estimate counts it)."""
        return self.kl_coef > 0


class GRPOConfig(AlgorithmBase):
    """``algorithm.name: grpo``: the group-relative policy-gradient family, chosen by the fields below."""

    name: Literal["grpo"] = Field(
        "grpo", description="'grpo' (the default): the group-relative policy-gradient family (GRPO, DAPO, Dr. GRPO, "
        "BNPO, GSPO, GFPO, CISPO, SAPO: chosen by the fields below); 'online_dpo': see OnlineDPOConfig.")
    loss_type: LossType = Field("dapo", description="Loss normalisation of the clipped surrogate (grpo, bnpo, "
                                "dr_grpo, dapo: TRL default), or another surrogate with its TRL normalisation: "
                                "'cispo' (the weight clipped and detached, every token's gradient kept; needs "
                                "epsilon_high, the weight's cap) or 'sapo' (a soft, temperature-controlled gate).")
    importance_sampling_level: ImportanceSamplingLevel = Field(
        "token", description="'token' (GRPO), 'sequence' (GSPO) or 'sequence_token' (GSPO-token)."
    )
    epsilon: float = Field(0.2, gt=0, description="Lower clip range: ratio >= 1 - epsilon.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip range (DAPO clip-higher); None = epsilon. "
                                       "With loss_type cispo: the cap on the importance weight itself (TRL's "
                                       "meaning; ScaleRL recommends 5.0).")
    delta: float | None = Field(None, gt=1, description="Two-sided clip: the unclipped ratio is capped at delta.")
    sapo_temperature_pos: float = Field(1.0, gt=0, description="SAPO's gate temperature for positive advantages "
                                        "(TRL default 1.0).")
    sapo_temperature_neg: float = Field(1.05, gt=0, description="SAPO's gate temperature for negative advantages "
                                        "(TRL default 1.05).")
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient; > 0 loads a frozen reference model.")
    num_iterations: int = Field(1, ge=1, description="mu: optimisation passes over each batch.")
    mask_truncated_completions: bool = False
    importance_sampling_cap: float | None = Field(
        3.0,
        gt=0,
        description="Truncated importance-sampling weight min(pi_proximal / pi_behaviour, cap) applied when the "
        "learner's proximal policy differs from the generator's (num_iterations > 1). None disables it.",
    )
    rollout_correction: RolloutCorrection = Field(
        "none", description="Correct the gap between the engine's and the learner's log-probs of the sampled tokens "
        "at every num_iterations: the ratio's base becomes the learner's own pre-step policy and the policy term is "
        "weighted by r = pi_learner / pi_engine, 'truncate'd to [rollout_correction_min, rollout_correction_max] "
        "(TIS) or set to 0 outside that band ('mask': MIS, IcePop). 'none': the base is the engine's log-probs at "
        "num_iterations 1, importance_sampling_cap's weights above it.")
    rollout_correction_level: RolloutCorrectionLevel = Field(
        "token", description="r per token, per sequence (the product of its tokens' ratios) or their geometric mean "
        "per sequence ('geometric', length-independent); a sequence's r weighs or masks all its tokens.")
    rollout_correction_min: float | None = Field(None, gt=0, description="Lower bound of r; None: none.")
    rollout_correction_max: float | None = Field(3.0, gt=0, description="Upper bound of r (TRL's clip_max, 3.0); "
                                                 "None: none.")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def kl_coef(self) -> float:
        return self.beta


class OnlineDPOConfig(AlgorithmBase):
    """``algorithm.name: online_dpo``: DPO on preference pairs formed from each scored group. Its objective's knobs
    are the ``dpo`` section's (beta, bema, pairs, min_reward_margin, max_length); none of GRPO's apply."""

    name: Literal["online_dpo"] = Field(
        "online_dpo", description="'online_dpo': DPO on the pairs of each scored group (the dpo section: beta, "
        "bema, pairs, min_reward_margin).")

    @property
    def keeps_reference(self) -> bool:
        """DPO's reference: a frozen copy (BEMA's), or with LoRA the adapter turned off."""
        return True

    @field_validator("environment")
    @classmethod
    def _single_turn(cls, value: str | None) -> str | None:
        """The shared field stays None here (the generators and the driver read it under either algorithm)."""
        if value is not None:
            raise ValueError(f"algorithm.environment: {value!r} with algorithm.name online_dpo; multi-turn "
                             "episodes are trained with the policy-gradient losses only. Remove it, or use "
                             "algorithm.name: grpo.")
        return value


def _algorithm_name(value: Any) -> str | None:
    """The variant of an ``algorithm`` value: its ``name``, 'grpo' when a mapping names none (job files written
    before the union have no name); None (pydantic's "no tag" error) for anything else."""
    if isinstance(value, dict):
        return value.get("name", "grpo")
    return getattr(value, "name", None)


ALGORITHMS: dict[str, type[AlgorithmBase]] = {"grpo": GRPOConfig, "online_dpo": OnlineDPOConfig}
Algorithm = Annotated[Union[Annotated[GRPOConfig, Tag("grpo")], Annotated[OnlineDPOConfig, Tag("online_dpo")]],
                      Discriminator(_algorithm_name)]
# The policy-gradient variant under the section's former name: most code that builds one by hand wants GRPO's knobs.
AlgorithmConfig = GRPOConfig
