"""The one configuration of an rlfleet run.

A run is described by :class:`RLFleetConfig`, made of sections (``model``, ``data``, ``generation``,
``algorithm``, ``replay``, ``learner``, ``dpo``, ``cluster``, ``checkpoint``, ``logging``). Values come from,
in increasing precedence: the defaults below, a YAML file, and dotted command-line overrides
(``learner.learning_rate=1e-5 generation.num_generations=8``).

Every section forbids unknown keys, so a typo fails loudly. Field names follow TRL where the concept is TRL's
(``num_generations``, ``loss_type``, ``epsilon``, ``beta``, ``num_remains_in_group``, BEMA's ``update_freq`` ...),
with TRL's defaults unless the field's doc says why not. Cross-field checks run at load time, before any actor
starts, and name the field, the value and the fix.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """An invalid configuration. ``str(err)`` lists one problem per line as ``field.path: message``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# A path a user may write as ``~/...``: the home directory is expanded, as a shell would (hub and built-in names,
# which never start with '~', pass unchanged).
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


class LoraConfig(Section):
    r: int = Field(gt=0, description="Adapter rank; the engines get the smallest vLLM rank slot >= r (at most 512).")
    alpha: float | None = Field(None, gt=0, description="Scaling alpha (the update is alpha / r * B A); None = 2 r.")
    dropout: float = Field(0.0, ge=0, le=0, description="Must be 0: the loss compares the learner's log-probs with "
                           "the engine's, which has no dropout (the learner turns every dropout off).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (peft's target_modules); 'all-linear': every linear layer "
        "of the decoder, the output layer excepted."
    )
    save_merged: bool = Field(False, description="At the end of a run, also write base + adapter merged, in Hugging "
                              "Face format, to output_dir/merged.")

    @property
    def scaling_alpha(self) -> float:
        return 2.0 * self.r if self.alpha is None else self.alpha


class ModelConfig(Section):
    name_or_path: UserPath = Field(
        "builtin:tiny",
        description="Hugging Face hub name, local directory, or 'builtin:tiny' (a random-init Qwen2 built offline).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of learner and engine (the learner keeps float32 master weights and "
        "runs under autocast). 'auto': bfloat16 on GPU, float32 on CPU. On CPUs with AMX (lscpu flag amx_bf16), "
        "bfloat16 steps faster: the engine samples in it, and the learner's attention stays in float32 "
        "(README 'Using the cores')."
    )
    max_model_len: int = Field(512, gt=0, description="Context length (prompt + completion) for the engine.")
    trust_remote_code: bool = False
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter (peft) instead of every weight; "
                                    "None = full fine-tuning.")


class DataConfig(Section):
    dataset: UserPath = Field(
        "builtin:char_count",
        description="'builtin:<task>' (see rlfleet.data.BUILTIN_TASKS), a local .json/.jsonl/.parquet/.csv file "
        "(one split, 'train'), a directory of such files (one split per file, named by its stem: train.jsonl, "
        "test.jsonl), or a hub dataset name.",
    )
    dataset_config: str | None = Field(
        None, description="Hub dataset subset (TRL's name), e.g. 'main' for openai/gsm8k; None for the default."
    )
    split: str = Field("train", description="Training split, in the datasets library's syntax for files and hub "
                       "datasets alike: 'train', 'train[:90%]', 'train[:40]' (built-in tasks: 'train' or 'test').")
    eval_split: str | None = Field(None, description="Evaluation split, same syntax: built-in tasks provide 'test'; "
                                   "a single file, e.g. 'train[90%:]' with data.split 'train[:90%]'. Of "
                                   "data.eval_dataset if set (default there: 'train', its whole file), else of "
                                   "data.dataset. `rlfleet train` evaluates on it every logging.eval_steps, "
                                   "`rlfleet dpo` every dpo.eval_steps.")
    eval_dataset: UserPath | None = Field(None, description="A separate evaluation source, named as data.dataset is (a "
                                     "file, a directory, a hub name, 'builtin:<task>'); None: data.dataset.")
    eval_dataset_config: str | None = Field(None, description="Hub subset of data.eval_dataset; None: its default.")
    eval_on_train: bool = Field(False, description="Allow evaluation prompts that are training prompts (the same "
                                "file, hub split or built-in split as data.split, with overlapping rows); they are "
                                "then reported as training prompts, never as held-out. Refused where nothing "
                                "overlaps.")
    max_eval_prompts: int | None = Field(None, gt=0, description="Evaluate on the first N evaluation prompts only; "
                                         "None: all.")
    column_mapping: dict[str, str] = Field(
        default_factory=dict, description="Rename dataset columns before use, e.g. {question: prompt}."
    )
    shuffle: bool = True
    max_prompts: int | None = Field(None, gt=0, description="Use only the first N prompts (after shuffling).")
    system_prompt: str | None = Field(
        None, description="Make every prompt a conversation that starts with this system message (a string prompt "
        "becomes the user's message; '' adds no system message). None: prompts as the dataset has them."
    )


class GenerationConfig(Section):
    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt (TRL default 8); at least 2, "
                                 "as a group's advantages compare its completions.")
    generation_batch_size: int = Field(
        32, gt=0, description="Completions per generation request to one actor; a multiple of num_generations."
    )
    max_completion_length: int = Field(256, gt=0, description="Max new tokens per completion (TRL default 512).")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="None or -1 disables top-k.")
    # engine
    tensor_parallel_size: int = Field(1, ge=1, description="GPU only: vLLM tensor parallel size per actor; "
                                      "cluster.generator_num_gpus gives each actor that many GPUs.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: vLLM's memory share.")
    kv_cache_space_gib: int = Field(1, ge=1, description="CPU only: vLLM KV-cache size (VLLM_CPU_KVCACHE_SPACE).")
    enforce_eager: bool = Field(True, description="Skip CUDA graphs / torch.compile: faster start, small models.")
    engine: Literal["batched", "continuous"] = Field(
        "batched", description="'batched': each request is one vLLM generate() call, weights loaded between requests. "
        "'continuous': the engine runs across requests, a group ships the moment its last completion ends, and new "
        "weights load between two engine steps with completions in flight (each token records its policy version; "
        "replay.max_staleness bounds the oldest token's lag).")
    max_inflight_groups: int | None = Field(
        None, ge=1, le=4096, description="Continuous engine: groups one generator keeps in flight at most; None: as "
        "many as its KV cache holds at full length (kv_cache_space_gib over one group's num_generations x "
        "(prompt + max_completion_length) tokens), at least 1.")
    kv_on_update: Literal["keep", "recompute"] = Field(
        "keep", description="Continuous engine, when new weights load mid-completion: 'keep' the KV cache computed "
        "under the old weights (later tokens attend to it); 'recompute' re-prefills every unfinished completion "
        "under the new weights first.")
    # multi-turn episodes (algorithm.environment)
    max_turns: int = Field(
        1, ge=1, description="Model turns per episode (with algorithm.environment); max_completion_length is per turn."
    )
    env_timeout_s: float = Field(
        30.0, gt=0, description="Longest an environment may take to answer one turn; past it the episode's group is "
        "dropped and counted in errors/env."
    )


LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
ImportanceSamplingLevel = Literal["token", "sequence", "sequence_token"]
RolloutCorrection = Literal["none", "truncate", "mask"]
RolloutCorrectionLevel = Literal["token", "sequence", "geometric"]


class AlgorithmConfig(Section):
    name: Literal["grpo", "online_dpo"] = Field(
        "grpo", description="'grpo': the group-relative policy-gradient family (GRPO, DAPO, Dr. GRPO, BNPO, GSPO, "
        "GFPO: chosen by the fields below); 'online_dpo': DPO on preference pairs formed from each scored group "
        "(the dpo section: beta, bema, pairs, min_reward_margin).")
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
    scale_rewards: Literal["group", "batch", "none"] = "group"
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
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class ReplayConfig(Section):
    replay_buffer_size: int = Field(
        0, ge=0,
        description="Capacity of the high-variance reservoir; 0 disables it (TRL's default 64 lives only in its "
        "replay trainer, and TRL crashes on 0).",
    )
    zero_variance: Literal["replay", "drop", "keep"] = Field(
        "keep",
        description="What a zero-reward-variance group becomes in a batch: 'replay' substitutes a reservoir group "
        "(TRL's replay trainer), 'drop' skips it (DAPO dynamic sampling), 'keep' trains on it (plain GRPO).",
    )
    max_staleness: int = Field(
        1, ge=0,
        description="Max policy versions between the weights that generated a group and the policy trained on it. "
        "0 = synchronous on-policy training.",
    )
    max_fresh: int = Field(4096, gt=0, description="Bound on groups queued for training; the oldest are dropped.")
    consume_order: Literal["arrival", "request"] = Field(
        "arrival", description="The order fresh groups are trained in. 'arrival': as they reach the replay actor; a "
        "request sampled with newer weights may then overtake one in flight on another generator, so admission holds "
        "new requests back while an older one is in flight, and at max_staleness 1 a fleet's generators wait for each "
        "other. "
        "'request': in the order their requests were made (a request's groups wait for every earlier request's); "
        "nothing is overtaken, admission counts only the current version, and at max_staleness 1 the generators of a "
        "fleet stop waiting for each other (with stand-in engines: 1.04-1.19x the groups per second with 4 "
        "generators, 1.03-1.42x with 8). A slow generator then holds back the groups requested after its own. One "
        "generator: the same either way.")


class LearnerConfig(Section):
    learning_rate: float = Field(1e-6, gt=0, description="Peak LR (TRL default 1e-6); `lr` is accepted too.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_steps: int = Field(100, gt=0, description="Learner optimizer steps in the run.")
    groups_per_step: int = Field(4, gt=0, description="Groups in one learner step's batch.")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward/backward pass.")
    gradient_checkpointing: bool = False
    logprob_chunk_tokens: int = Field(
        1024, ge=0, description="Completion positions whose logits are built at once (output layer + log-softmax, "
        "rebuilt in the backward pass); 0 builds a micro-batch's [B, T, V] logits whole. With a 151,936-token "
        "vocabulary, 1024 positions are 0.6 GB of float32 logits.")
    pack_sequences: bool = Field(
        False, description="Concatenate a micro-batch's sequences into one row without padding (positions restart "
        "per sequence; Hugging Face's masks keep each sequence to itself): no compute on padding when lengths differ.")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class BEMAConfig(Section):
    """BEMA (arXiv 2508.00180), TRL's BEMACallback knobs and defaults."""

    update_freq: int = Field(400, ge=1, description="phi: steps between BEMA updates.")
    ema_power: float = Field(0.5, ge=0, description="kappa; 0 makes the EMA equal the current weights.")
    bias_power: float = Field(0.2, ge=0, description="eta; 0 gives alpha = 1.")
    lag: float = Field(10.0, ge=0, description="rho.")
    update_after: int = Field(0, ge=0, description="tau: burn-in steps; the snapshot theta_0 is taken at tau.")
    multiplier: float = Field(1.0, gt=0, description="gamma.")
    min_ema_multiplier: float = Field(0.0, ge=0, le=1, description="Floor on the EMA coefficient beta.")
    update_ref_model: bool = Field(True, description="Load the BEMA weights into the DPO reference model.")
    ref_model_update_freq: int = Field(400, ge=1)
    ref_model_update_after: int = Field(0, ge=0)


class DPOConfig(Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature (TRL default 0.1).")
    loss_type: Literal["sigmoid"] = "sigmoid"
    max_length: int = Field(1024, gt=0, description="Max prompt + completion tokens (TRL default 1024).")
    batch_size: int = Field(8, gt=0, description="`rlfleet dpo`: preference pairs per optimizer step (online DPO "
                            "trains on the pairs of learner.groups_per_step groups).")
    eval_steps: int = Field(10, gt=0, description="`rlfleet dpo`: held-out accuracy every N steps (`rlfleet train` "
                            "evaluates every logging.eval_steps).")
    pairs: Literal["best_worst", "all"] = Field(
        "best_worst", description="Online DPO (algorithm.name: online_dpo): the pairs of a scored group. "
        "'best_worst': its highest-reward completion against its lowest; 'all': every pair whose rewards differ by "
        "more than min_reward_margin.")
    min_reward_margin: float = Field(
        0.0, ge=0, description="Online DPO: a pair's chosen reward must exceed its rejected reward by more than "
        "this; a group with no such pair is dropped and counted (dpo/unpaired_groups).")
    bema: BEMAConfig | None = Field(default_factory=BEMAConfig, description="None disables BEMA (frozen ref).")


class GeneratorRange(Section):
    """An elastic fleet: the job starts once ``min`` generators are placed and grows to ``max`` as room appears."""

    min: int = Field(1, ge=1, description="Generators needed to start (and the fleet's size if the cluster is full).")
    max: int = Field(1, ge=1, description="Generators the job grows to when the cluster has room.")

    @model_validator(mode="after")
    def _ordered(self) -> GeneratorRange:
        if self.min > self.max:
            raise ValueError(f"cluster.num_generators: min {self.min} is more than max {self.max}; "
                             "use min <= max")
        return self


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray address; None uses RAY_ADDRESS, else starts a local cluster (the embedded default)."
    )
    num_generators: Annotated[int, Field(ge=1)] | GeneratorRange | Literal["auto"] = Field(
        1, description="Generation actors: a number, {min, max} for a fleet that grows and shrinks with the "
        "cluster (each generator is placed on its own; see README 'Elastic fleets'), or 'auto': as many as the "
        "cluster's CPUs (GPUs, for GPU generators) hold beside the learner, counted when the job starts; min 1.")
    generator_num_gpus: float = Field(
        0, ge=0, description="GPUs per generation actor: generation.tensor_parallel_size of them, or a share of one "
        "(below 1) with tensor_parallel_size 1; 0: CPU generators.")
    generator_num_cpus: float = Field(1, gt=0)
    requests_per_generator: int = Field(
        2, ge=1, description="Generation requests queued on each generator at once (within the staleness bound): with "
        "2, the engine starts the next as soon as one ends, while the driver handles its result; 1 waits for the "
        "driver between requests.")
    learner_num_gpus: float = Field(0, ge=0)
    learner_num_cpus: float = Field(1, gt=0)
    learner_threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="CPU: torch threads of each learner rank; None = learner_num_cpus (Ray sets "
        "OMP_NUM_THREADS to an actor's CPUs). More than its CPUs borrows the cores the generators leave idle (its "
        "OpenMP threads then wait passively): on 2 cores, 2 threads made learner-bound steps 8-10% faster and "
        "generation-bound ones 1.3-1.4x slower. 'auto' borrows every core of the learner's node while the learner "
        "is the slow stage (it waits for batches less than 5% of its time) and gives them back when it waits more "
        "than 15% (rlfleet/learner/threads.py).")
    learner_workers: int = Field(
        1, ge=1, description="Learner ranks: one torch.distributed group (gloo on CPU, NCCL on GPU), each rank holding "
        "an FSDP2 shard of the model and optimizer state and learner_num_cpus / learner_num_gpus of its own.")
    local_num_cpus: int | None = Field(None, gt=0, description="CPUs a local cluster advertises; None = enough.")
    max_restarts: int = Field(3, ge=0, description="Ray restarts per generation actor.")
    timeout_s: float = Field(600.0, gt=0, description="Timeout of every blocking call on an actor.")
    weight_transport: Literal["object_store", "broadcast"] = Field(
        "object_store", description="How weights reach the generators (rlfleet.transport): object_store (one "
        "packed host buffer through Ray's object store) or broadcast (a collective through vLLM's RL weight-transfer "
        "API; CPU generators, gloo).")
    weight_sync_timeout_s: float = Field(
        120.0, gt=0, description="broadcast: timeout of a round's collectives. A generator that dies during a round "
        "holds the others' receive until then (gloo does not wake them), after which the group is rebuilt.")
    job_name: str | None = Field(
        None, description="Names the job's Ray namespace (rlfleet-<job_name>) for `rlfleet scale --job`; "
        "None uses the last part of output_dir.")

    @property
    def min_generators(self) -> int:
        n = self.num_generators
        return 1 if n == "auto" else n if isinstance(n, int) else n.min

    @property
    def max_generators(self) -> int | None:
        """None for 'auto' (:func:`rlfleet.cluster.runtime.fleet_size` counts it on the cluster)."""
        n = self.num_generators
        return None if n == "auto" else n if isinstance(n, int) else n.max


class CheckpointConfig(Section):
    save_steps: int = Field(50, gt=0, description="Checkpoint every N learner steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    resume: bool = Field(False, description="Continue from the latest checkpoint in output_dir.")


class LoggingConfig(Section):
    progress: Literal["auto", "bar", "plain"] = Field("auto", description="'auto': a bar on a TTY, lines otherwise.")
    log_every: int = Field(1, gt=0)
    plot: bool = True
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Loggers fed each step's record besides metrics.jsonl: 'tensorboard' "
        "(event files in output_dir/tensorboard), 'wandb' (needs the wandb package; WANDB_MODE=offline works "
        "without network).")
    wandb_project: str = "rlfleet"
    eval_steps: int | None = Field(
        None, gt=0, description="`rlfleet train`: every N learner steps, and at the end, one generator scores the "
        "evaluation prompts (data.eval_split, of data.eval_dataset if set) with that step's weights, between "
        "training requests: eval/reward/mean. None: no evaluation.")
    eval_greedy: bool = Field(True, description="Evaluate with greedy decoding; false: the training temperature.")
    eval_num_generations: int = Field(1, gt=0, description="Samples per evaluation prompt (more than 1 needs "
                                      "eval_greedy: false).")
    engine_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Level of vLLM's own log lines in the generation actors (INFO shows every engine "
        "start and weight reload).")

    @model_validator(mode="after")
    def _loggers_installed(self) -> LoggingConfig:
        import importlib.util

        missing = [name for name in self.report_to if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"report_to: {missing} need the package(s) of that name; install them "
                             f"(pip install {' '.join(missing)}) or remove them from logging.report_to")
        return self


# ----------------------------------------------------------------------------------------------------------------
# Root
# ----------------------------------------------------------------------------------------------------------------


# Options that were removed, by dotted path: what replaced each, or that it can go. A job file that still sets one is
# refused with that message (before the generic unknown-key error).
REMOVED_FIELDS = {
    "cluster.placement_strategy": "it had no effect (each actor has a placement group of its own, so the job starts "
                                  "with the generators that fit and grows); delete it from the job file",
}


def removed_field_problems(data: Any) -> list[str]:
    """One line per option of :data:`REMOVED_FIELDS` that the raw (unvalidated) ``data`` still sets."""
    out = []
    for path, why in REMOVED_FIELDS.items():
        *sections, name = path.split(".")
        node = data
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            out.append(f"{path}: removed; {why}.")
    return out


class RLFleetConfig(Section):
    output_dir: UserPath = "runs/default"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_removed_fields(cls, data: Any) -> Any:
        problems = removed_field_problems(data)
        if problems:
            raise ValueError("\n".join(problems))
        return data

    @model_validator(mode="after")
    def _cross_field_checks(self) -> RLFleetConfig:
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def group_size(self) -> int:
        """Completions per group after GFPO filtering."""
        return self.algorithm.num_remains_in_group or self.generation.num_generations


def cross_field_problems(cfg: RLFleetConfig) -> list[str]:
    """Checks that involve more than one field. Each message names the field, the value and the fix."""
    gen, alg, rep = cfg.generation, cfg.algorithm, cfg.replay
    out: list[str] = []
    G = gen.num_generations
    if gen.generation_batch_size % G:
        out.append(
            f"generation.generation_batch_size: {gen.generation_batch_size} is not divisible by "
            f"generation.num_generations ({G}). Use a multiple of {G}, e.g. "
            f"{G * max(1, gen.generation_batch_size // G)}."
        )
    k = alg.num_remains_in_group
    if k is not None:
        if k >= G:
            out.append(
                f"algorithm.num_remains_in_group: {k} must be less than generation.num_generations ({G}); "
                f"keep k < G (e.g. {G - 1}) or raise num_generations."
            )
        if alg.group_filter_func is None:
            out.append(
                "algorithm.group_filter_func: required when algorithm.num_remains_in_group is set; use "
                "'shortest', 'token_efficiency' or 'package.module:function'."
            )
    elif alg.group_filter_func is not None:
        out.append(
            f"algorithm.num_remains_in_group: must be set when algorithm.group_filter_func "
            f"({alg.group_filter_func!r}) is, e.g. {max(2, G // 2)}."
        )
    out += surrogate_problems(alg)
    if alg.reward_weights is not None and len(alg.reward_weights) != len(alg.reward_funcs):
        out.append(
            f"algorithm.reward_weights: {len(alg.reward_weights)} weights for {len(alg.reward_funcs)} "
            "algorithm.reward_funcs; give one weight per function."
        )
    if alg.environment is None and (gen.max_turns > 1 or alg.environment_kwargs):
        field = "generation.max_turns" if gen.max_turns > 1 else "algorithm.environment_kwargs"
        out.append(f"{field}: set without algorithm.environment; name an environment (e.g. 'scripted_user') or "
                   "remove it.")
    elif alg.environment is not None and gen.max_turns < 2:
        out.append(f"generation.max_turns: {gen.max_turns} gives the environment {alg.environment!r} no turn to "
                   "answer; set it to 2 or more (the model's turns per episode).")
    if alg.name == "online_dpo":
        out += online_dpo_problems(cfg)
    log = cfg.logging
    data = cfg.data
    if log.eval_steps is not None and data.eval_split is None and data.eval_dataset is None:
        out.append(f"data.eval_split: required by logging.eval_steps ({log.eval_steps}); name the held-out split "
                   "(built-in tasks: 'test'; a single file: e.g. 'train[90%:]' with data.split 'train[:90%]') or "
                   "a separate file with data.eval_dataset, or remove logging.eval_steps.")
    if data.eval_dataset_config is not None and data.eval_dataset is None:
        out.append(f"data.eval_dataset_config: {data.eval_dataset_config!r} is set without data.eval_dataset; name "
                   "the evaluation dataset or remove it.")
    if data.eval_on_train and data.eval_split is None and data.eval_dataset is None:
        out.append("data.eval_on_train: true without an evaluation split; set data.eval_split (or "
                   "data.eval_dataset), or remove data.eval_on_train.")
    if log.eval_greedy and log.eval_num_generations > 1:
        out.append(f"logging.eval_num_generations: {log.eval_num_generations} greedy samples of a prompt are all the "
                   "same; set logging.eval_greedy: false to sample at the training temperature, or use 1.")
    lora = cfg.model.lora
    if lora is not None and cfg.cluster.weight_transport == "broadcast":
        out.append("cluster.weight_transport: 'broadcast' sends whole models; with model.lora the adapter (megabytes) "
                   "goes through the object store: use 'object_store'.")
    if rep.zero_variance == "replay" and rep.replay_buffer_size == 0:
        out.append(
            "replay.zero_variance: 'replay' needs a reservoir; set replay.replay_buffer_size > 0 "
            "(e.g. 64) or choose 'drop' / 'keep'."
        )
    if gen.max_completion_length >= cfg.model.max_model_len:
        out.append(
            f"generation.max_completion_length: {gen.max_completion_length} leaves no room for the prompt in "
            f"model.max_model_len ({cfg.model.max_model_len}); raise max_model_len or lower max_completion_length."
        )
    prompts = gen.generation_batch_size // G
    window = (rep.max_staleness + 1) * cfg.learner.groups_per_step
    if prompts > window:
        out.append(
            f"generation.generation_batch_size: {gen.generation_batch_size} completions = {prompts} prompts per "
            f"request, more than the (replay.max_staleness + 1) * learner.groups_per_step = {window} groups the "
            f"staleness bound lets one policy version produce. Use at most {window * G}, or raise "
            "replay.max_staleness or learner.groups_per_step."
        )
    if gen.engine == "continuous":
        if lora is not None:
            out.append("generation.engine: continuous loads full weights in flight; an adapter (model.lora) is not "
                       "carried in flight yet: use generation.engine: batched with model.lora.")
        if alg.environment is not None:
            out.append("generation.engine: continuous runs single-turn groups; multi-turn episodes "
                       f"(algorithm.environment: {alg.environment!r}) run on generation.engine: batched.")
    elif gen.max_inflight_groups is not None or gen.kv_on_update != "keep":
        field = "generation.max_inflight_groups" if gen.max_inflight_groups is not None else "generation.kv_on_update"
        out.append(f"{field}: applies to generation.engine: continuous only; set that, or remove {field}.")
    if gen.top_k == 0:
        out.append("generation.top_k: 0 is not a valid top-k; use None or -1 to disable it, or a positive value.")
    c, tp = cfg.cluster, gen.tensor_parallel_size
    gpus = c.generator_num_gpus
    if gpus and tp != max(1, gpus):  # CPU generators ignore tensor_parallel_size; a share of one GPU (< 1) runs 1
        other = f" or generation.tensor_parallel_size: {gpus:g}" if gpus >= 1 and gpus == int(gpus) else ""
        out.append(f"generation.tensor_parallel_size: {tp} with cluster.generator_num_gpus: {gpus:g}; a GPU "
                   "generator's engine shards the model over tensor_parallel_size GPUs of its own (a share of one "
                   f"GPU runs tensor_parallel_size 1): set cluster.generator_num_gpus: {tp}{other}.")
    if c.weight_transport == "broadcast" and c.generator_num_gpus:
        out.append("cluster.weight_transport: broadcast runs on CPU generators (rlfleet's gloo backend for vLLM's "
                   "weight-transfer API); GPU generators (vLLM's nccl backend) are not supported yet: use "
                   "object_store there.")
    if c.learner_workers > 1 and 0 < c.learner_num_gpus < 1:
        out.append(f"cluster.learner_num_gpus: {c.learner_num_gpus:g} with cluster.learner_workers="
                   f"{c.learner_workers}; each rank of a learner group needs a GPU of its own for NCCL: use "
                   "learner_num_gpus: 1 (or 0 for CPU ranks over gloo).")
    if c.learner_threads == "auto" and c.learner_workers > 1:
        out.append(f"cluster.learner_threads: auto with cluster.learner_workers={c.learner_workers}; auto lets one "
                   "learner process borrow its node's cores, and ranks sharing a node would each take all of them: "
                   "give a number of threads per rank, or use learner_workers: 1.")
    if c.learner_workers > 1 and cfg.learner.device == "cuda" and not c.learner_num_gpus:
        out.append(f"learner.device: cuda with cluster.learner_workers={c.learner_workers} and "
                   "cluster.learner_num_gpus: 0; give each rank a GPU (learner_num_gpus: 1) or use device cpu/auto.")
    return out


def surrogate_problems(alg: AlgorithmConfig) -> list[str]:
    """Knobs that the chosen surrogate has no use for or needs: CISPO's cap, the clipped surrogate's delta and
    SAPO's temperatures."""
    out = []
    lo, hi = alg.rollout_correction_min, alg.rollout_correction_max
    if alg.rollout_correction != "none" and lo is None and hi is None:
        out.append(f"algorithm.rollout_correction: {alg.rollout_correction} with neither rollout_correction_min nor "
                   "rollout_correction_max; set a bound (e.g. rollout_correction_max: 3.0).")
    if (lo is not None and lo > 1) or (hi is not None and hi < 1):
        field, value = ("rollout_correction_min", lo) if lo is not None and lo > 1 else ("rollout_correction_max", hi)
        out.append(f"algorithm.{field}: {value:g} leaves r = 1 (a token the engine and the learner agree on) outside "
                   "the band; keep rollout_correction_min <= 1 <= rollout_correction_max (e.g. 0.5 and 2.0).")
    if alg.loss_type == "cispo" and alg.epsilon_high is None:
        out.append("algorithm.epsilon_high: required with loss_type cispo, which caps the importance weight at "
                   "epsilon_high itself (TRL's meaning, not 1 + epsilon_high); ScaleRL recommends 5.0.")
    if alg.loss_type == "cispo" and alg.importance_sampling_level == "sequence_token":
        out.append("algorithm.importance_sampling_level: sequence_token with loss_type cispo is 'sequence' itself "
                   "(CISPO's weight carries no gradient, every token's log-prob does); use sequence.")
    if alg.loss_type in ("cispo", "sapo") and alg.delta is not None:
        out.append(f"algorithm.delta: {alg.delta:g} caps the clipped surrogate's ratio, which loss_type "
                   f"{alg.loss_type} does not use; remove it.")
    if alg.loss_type != "sapo":
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            value = getattr(alg, name)
            if value != AlgorithmConfig.model_fields[name].default:
                out.append(f"algorithm.{name}: {value:g} is SAPO's; set loss_type sapo or remove it.")
    return out


def online_dpo_problems(cfg: RLFleetConfig) -> list[str]:
    """Fields that online DPO has no use for (the policy-gradient family's, and `rlfleet dpo`'s where online DPO
    has its own), set to something else than their default, and a dpo.max_length that would cut the generators'
    sequences."""
    out = []
    grpo_only = "Remove it, or use algorithm.name: grpo"
    unused = {"algorithm.beta": f"DPO's temperature is dpo.beta; its reference is BEMA's (dpo.bema). {grpo_only}",
              "algorithm.num_iterations": f"a DPO step is one pass over its pairs. {grpo_only}",
              "algorithm.environment": "multi-turn episodes are trained with the policy-gradient losses only. "
                                       + grpo_only,
              "dpo.batch_size": "a step trains on the pairs of learner.groups_per_step groups (dpo.batch_size is "
                                "`rlfleet dpo`'s); set learner.groups_per_step and remove dpo.batch_size",
              "dpo.eval_steps": "`rlfleet train` evaluates every logging.eval_steps (dpo.eval_steps is `rlfleet "
                                "dpo`'s); set logging.eval_steps and remove dpo.eval_steps"}
    for path, why in unused.items():
        section, name = path.split(".")
        value, default = getattr(getattr(cfg, section), name), type(getattr(cfg, section)).model_fields[name].default
        if value != default:
            out.append(f"{path}: {value!r} with algorithm.name online_dpo; {why}.")
    if cfg.dpo.max_length < cfg.model.max_model_len:
        out.append(f"dpo.max_length: {cfg.dpo.max_length} is less than model.max_model_len ({cfg.model.max_model_len});"
                   " online DPO trains on the generators' whole sequences: raise dpo.max_length to at least "
                   f"{cfg.model.max_model_len}.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r}: expected key=value, e.g. learner.learning_rate=1e-5"])
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part} is set to a value and used as a section"])
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


# Short spellings accepted in files and overrides, rewritten to the field's name before merging.
ALIASES = {("learner", "lr"): "learning_rate"}


def _canonical(data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, value in data.items():
        if isinstance(value, dict):
            value = {ALIASES.get((section, k), k): v for k, v in value.items()}
        out[section] = value
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _field_path(loc: tuple[int | str, ...]) -> tuple[str, bool]:
    """An error's ``loc`` as a dotted field path, without the label pydantic puts after a field whose type is a union
    to say which member it tried (``cluster.num_generators.constrained-int``); and whether the error is about that
    member as a whole rather than a field inside it."""
    parts, model, whole_member, i = [], RLFleetConfig, False, 0
    while i < len(loc):
        part, i = loc[i], i + 1
        parts.append(str(part))
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            model = None
            continue
        union = get_origin(field.annotation) in (Union, UnionType)
        types = [t for t in get_args(field.annotation) if t is not type(None)] if union else [field.annotation]
        models = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        model = models[0] if len(models) == 1 else None
        if len(types) > 1:  # skip the member's label
            i += 1
            whole_member = i == len(loc)
    return ".".join(parts), whole_member


def _format_validation_error(err: ValidationError) -> list[str]:
    problems, located, other_type = [], [], {}
    for e in err.errors():
        loc, whole_member = _field_path(e["loc"])
        if whole_member and (e["type"].endswith(("_type", "_parsing")) or e["type"] == "literal_error"):
            other_type.setdefault(loc, []).append(e)  # a union member of another type: said below if none fits
            continue
        located.append(loc)
        if e["type"] == "value_error":  # our cross-field checks: already "field: message", one per line
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
            problems.extend(line for line in msg.splitlines() if line)
        elif e["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key (check the spelling; `rlfleet config` prints every known key)")
        elif e["type"] == "greater_than_equal":
            n = e["ctx"]["ge"]
            problems.append(f"{loc}: {e['input']!r} is negative; use 0 or more" if n == 0 else
                            f"{loc}: {e['input']!r} is less than {n}; use {n} or more")
        else:
            problems.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    for loc, errors in other_type.items():
        if not any(p == loc or p.startswith(loc + ".") for p in located):  # no member of the union took the value
            ways = [errors[0]["msg"]] + [e["msg"].removeprefix("Input should be ") for e in errors[1:]]
            problems.append(f"{loc}: {'; or '.join(ways)} (got {errors[0].get('input')!r})")
    return problems


def config_from_dict(data: dict[str, Any]) -> RLFleetConfig:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return RLFleetConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RLFleetConfig:
    """Defaults < YAML file at ``path`` < dotted ``overrides``. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(p)!r} does not exist; pass the path of a YAML job config"])
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
            raise ConfigError([f"config file {str(p)!r}{where}: not valid YAML: {what or err}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}"])
        data = loaded or {}
    return config_from_dict(_merge(_canonical(data), _canonical(parse_overrides(overrides or []))))


def dump_config(cfg: RLFleetConfig) -> str:
    return json.dumps(cfg.model_dump(mode="json"), indent=2)
