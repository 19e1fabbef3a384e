"""The root of the configuration, :class:`RLFleetConfig`, and its cross-field checks: rules that involve more than
one field, run when it is validated, each returning one line per problem as ``field.path: message`` that names the
field, the value and the fix. Import these names from :mod:`rlfleet.config`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from rlfleet.config_algorithm import Algorithm, GRPOConfig
from rlfleet.config_sections import (CheckpointConfig, ClusterConfig, DataConfig, DPOConfig, GenerationConfig,
                                     LearnerConfig, LoggingConfig, ModelConfig, ReplayConfig, Section, UserPath)


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
    algorithm: Algorithm = Field(default_factory=GRPOConfig, description="name: grpo (the default) or online_dpo, "
                                 "each with its own fields (rlfleet.config_algorithm).")
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
    out += VARIANT_PROBLEMS[alg.name](cfg)
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
    if gen.engine != "continuous" and (gen.max_inflight_groups is not None or gen.kv_on_update != "keep"):
        field = "generation.max_inflight_groups" if gen.max_inflight_groups is not None else "generation.kv_on_update"
        out.append(f"{field}: applies to generation.engine: continuous only; set that, or remove {field}.")
    out += token_unit_problems(cfg)
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
    out += colocate_problems(cfg)
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


def token_unit_problems(cfg) -> list[str]:
    """What ``replay.staleness_unit: token`` needs: tokens of several versions in a group (the continuous engine),
    fresh groups only (the reservoir's replays are outside the bound by design), and policy-gradient tokens (online
    DPO's pairs compare whole completions)."""
    rep, gen = cfg.replay, cfg.generation
    if rep.staleness_unit != "token":
        return []
    out = []
    if gen.engine != "continuous":
        out.append("replay.staleness_unit: 'token' with generation.engine: batched, whose groups are sampled by one "
                   "version throughout (a token bound is the group bound there); set generation.engine: continuous, "
                   "or staleness_unit: group.")
    if rep.zero_variance == "replay":
        out.append("replay.staleness_unit: 'token' with replay.zero_variance: 'replay': reservoir groups train "
                   "outside the staleness bound by design, and the token mask would empty them; use 'drop' or "
                   "'keep', or staleness_unit: group.")
    if cfg.algorithm.name == "online_dpo":
        out.append("replay.staleness_unit: 'token' with algorithm.name: online_dpo, whose pairs compare whole "
                   "completions (no token of one can be left out); use staleness_unit: group.")
    if rep.consume_order == "request":
        out.append("replay.staleness_unit: 'token' with replay.consume_order: 'request': request order makes groups "
                   "wait for earlier ones, which the token bound exists to avoid; use consume_order: arrival, or "
                   "staleness_unit: group.")
    return out


def colocate_problems(cfg) -> list[str]:
    """What ``cluster.colocate`` cannot run with: generators of their own, an engine over several GPUs or with the
    default GPU share, the broadcast transport (weights stay in the process); what ``generation.sleep_level``
    needs."""
    c, gen = cfg.cluster, cfg.generation
    out = []
    if gen.sleep_level and not c.colocate:
        out.append(f"generation.sleep_level: {gen.sleep_level} puts a colocated engine to sleep while its learner "
                   "steps; set cluster.colocate: true, or remove sleep_level.")
    elif gen.sleep_level and gen.engine == "continuous":
        out.append(f"generation.sleep_level: {gen.sleep_level} with generation.engine: continuous: sleeping frees the "
                   "KV cache of the completions in flight; use engine: batched, or sleep_level: 0.")
    if gen.sleep_level == 2 and cfg.model.lora is not None:
        out.append("generation.sleep_level: 2 discards the engine's base weights, which a LoRA publication (the "
                   "adapter alone) does not bring back; use sleep_level: 1 with model.lora.")
    if not c.colocate:
        return out
    if "num_generators" in c.model_fields_set and c.num_generators != c.learner_workers:
        out.append(f"cluster.num_generators: {c.num_generators} with cluster.colocate: the job's engines are its "
                   f"learner ranks', one each (cluster.learner_workers: {c.learner_workers}); use num_generators: "
                   f"{c.learner_workers} (or remove it), or colocate: false for generators of their own.")
    if gen.tensor_parallel_size > 1:
        out.append(f"generation.tensor_parallel_size: {gen.tensor_parallel_size} with cluster.colocate: a colocated "
                   "engine runs on its learner rank's one GPU; use 1.")
    if c.learner_num_gpus and gen.gpu_memory_utilization > 0.5:
        out.append(f"generation.gpu_memory_utilization: {gen.gpu_memory_utilization:g} with cluster.colocate on GPU: "
                   "the learner holds its model, gradients and optimizer state on the same GPU; give the engine "
                   "the share it may take (TRL's colocated default is 0.3).")
    if c.learner_threads is not None and c.learner_threads != c.learner_num_cpus and not c.learner_num_gpus:
        out.append(f"cluster.learner_threads: {c.learner_threads} with cluster.colocate on CPU: the learner shares its "
                   "process's threads with vLLM's CPU engine, whose attention kernels check that the count stays what "
                   f"it was when the engine started (cluster.learner_num_cpus: {c.learner_num_cpus:g}); remove "
                   "learner_threads, or colocate: false.")
    if c.weight_transport == "broadcast":
        out.append("cluster.weight_transport: 'broadcast' with cluster.colocate: a colocated engine loads the "
                   "learner's tensors in its own process; remove weight_transport (or use object_store).")
    return out


def surrogate_problems(alg: GRPOConfig) -> list[str]:
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
            if value != type(alg).model_fields[name].default:
                out.append(f"algorithm.{name}: {value:g} is SAPO's; set loss_type sapo or remove it.")
    return out


def online_dpo_problems(cfg: RLFleetConfig) -> list[str]:
    """`rlfleet dpo`'s fields where online DPO has its own, set to something else than their default, and a
    dpo.max_length that would cut the generators' sequences. GRPO's fields and an environment are refused by
    :class:`~rlfleet.config_algorithm.OnlineDPOConfig` itself."""
    out = []
    unused = {"dpo.batch_size": "a step trains on the pairs of learner.groups_per_step groups (dpo.batch_size is "
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


# The checks of each algorithm's own fields, by algorithm.name.
VARIANT_PROBLEMS: dict[str, Callable[[RLFleetConfig], list[str]]] = {
    "grpo": lambda cfg: surrogate_problems(cfg.algorithm),
    "online_dpo": online_dpo_problems,
}
