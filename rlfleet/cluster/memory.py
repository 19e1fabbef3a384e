"""How much memory a job needs, estimated from the model and the config before anything starts. Pure arithmetic
(plus reading the model's config, never its weights).

Per generation actor: the engine process (``ENGINE_PROCESS_GIB``: Python, torch, vLLM; measured 0.7 GiB with the
tiny model on CPU), its KV cache (``generation.kv_cache_space_gib`` on CPU; on GPU vLLM takes a share of the GPU
instead), and the weights twice (the engine's copy and an update in flight). Learner: its process
(``LEARNER_PROCESS_GIB``), float32 master weights, gradients and AdamW's two moments (16 bytes a parameter; with
``model.lora``, 4 bytes a frozen base parameter and 16 an adapter parameter), and a frozen reference model in the
compute dtype when one is kept (``beta > 0``, DPO; with LoRA only DPO with BEMA), and the log-prob pass's logits:
``LOGIT_COPIES`` float32 copies of one chunk's ``[positions, vocabulary]`` logits (a micro-batch's completion
positions, at most ``learner.logprob_chunk_tokens`` when chunking; bench/logprob_memory.py measured 4.6 copies at
the peak with whole logits). Publishing weights holds two host copies in the compute dtype, even for a learner on a
GPU: the learner's packed buffer and the object-store object made from it (:mod:`rlfleet.transport.packed`). A
learner group of K ranks (``cluster.learner_workers``) splits the weights, gradients, optimizer state and
reference model K ways, while each rank has its own process and logits, and each rank holds one more gathered copy
of the weights while they are published (:func:`rlfleet.learner.distributed.full_state_dict`). Colocated
(``cluster.colocate``): each engine lives in a learner rank's process and loads the learner's own tensors (a group's
gathered ones), so the job has one generator per rank, each engine holds one copy of the weights (no update in
flight), and nothing is packed or put in the object store. Other
activations are not counted: the estimate is a floor, used to refuse jobs that
cannot fit, not to promise that one will.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

GIB = 2**30
ENGINE_PROCESS_GIB = 0.75
LEARNER_PROCESS_GIB = 0.8
LOGIT_COPIES = 4  # logits, their temperature-scaled float32 copy, the softmax's exp, their gradient


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    generator_gib: float
    learner_gib: float

    def total_gib(self, generators: int) -> float:
        return self.learner_gib + generators * self.generator_gib


def count_parameters(name_or_path: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """Parameters and vocabulary size of the model at ``name_or_path``, from its config alone (built on the meta
    device)."""
    model = meta_model(name_or_path, trust_remote_code)
    vocab = model.get_output_embeddings().weight.shape[0]
    return sum(p.numel() for p in model.parameters()), vocab  # tied weights are counted once


def estimate(params: int, engine_bytes_per_param: int, kv_cache_gib: float, reference_bytes_per_param: int,
             generator_on_gpu: bool = False, learner_on_gpu: bool = False, logit_positions: int = 0,
             vocab: int = 0, publish_bytes_per_param: int = 0, learner_ranks: int = 1,
             trainable: int | None = None, colocated: bool = False,
             offload_optimizer: bool = False) -> MemoryEstimate:
    """Host memory. ``engine_bytes_per_param``: 4 for float32 engines, 2 for bfloat16; ``reference_bytes_per_param``:
    0 without a reference model; ``logit_positions``: the completion positions whose logits the learner builds at
    once; ``publish_bytes_per_param``: the compute dtype's size (0: the learner publishes nothing). An actor on a
    GPU keeps its weights, KV cache, optimizer state and activations there: its process and the host copies of the
    published weights count here. ``learner_gib`` is the whole learner group's (``learner_ranks`` processes).
    ``trainable``: the parameters trained and published when not all are (a LoRA adapter's): the others carry
    float32 weights only. ``colocated``: each engine in a learner rank's process with one copy of the weights, loaded
    from the learner's: nothing is packed or put in the object store (a group's ranks still gather a copy each).
    ``offload_optimizer``: a learner on a GPU keeps AdamW's two moments in host memory between steps."""
    generator = ENGINE_PROCESS_GIB
    if not generator_on_gpu:
        generator += kv_cache_gib + (1 if colocated else 2) * params * engine_bytes_per_param / GIB
    k = learner_ranks
    trained = params if trainable is None else trainable
    # packed buffer + object-store object (not colocated: the engine loads the learner's own tensors), + one gathered
    # copy per rank of a group
    copies = (0 if colocated else 2) + (k if k > 1 else 0)
    learner = k * LEARNER_PROCESS_GIB + copies * trained * publish_bytes_per_param / GIB
    if not learner_on_gpu:
        learner += (params * (4 + reference_bytes_per_param) + trained * 12) / GIB
        learner += k * LOGIT_COPIES * logit_positions * vocab * 4 / GIB
    elif offload_optimizer:
        learner += trained * 8 / GIB
    return MemoryEstimate(params, generator, learner)


def job_estimate(cfg, with_reference: bool, dpo: bool = False) -> MemoryEstimate:
    """:func:`estimate` for an :class:`~rlfleet.config.RLFleetConfig` (the model's config is read, not its
    weights)."""
    import torch

    from rlfleet.models import engine_dtype, publish_dtype, torch_dtype

    c = cfg.cluster
    engine_gpus = c.learner_num_gpus if c.colocate else c.generator_num_gpus
    engine = engine_dtype(cfg.model, cfg.generation, engine_gpus > 0)
    learner_dtype = torch_dtype(cfg.model.dtype, "cuda" if c.learner_num_gpus else "cpu")
    size = torch.empty((), dtype=engine).element_size()
    ref_size = torch.empty((), dtype=learner_dtype).element_size() if with_reference else 0
    params, vocab = count_parameters(cfg.model.name_or_path, cfg.model.trust_remote_code)
    trainable = None
    if cfg.model.lora is not None:  # the reference is the adapter disabled, but BEMA's is a copy
        trainable = adapter_parameters(cfg.model.name_or_path, cfg.model.lora, cfg.model.trust_remote_code)
        if not (dpo and cfg.dpo.bema is not None):
            ref_size = 0
    published = 0 if dpo else publish_dtype(cfg.model, cfg.generation, learner_dtype, engine_gpus > 0).itemsize
    return estimate(params, size, cfg.generation.kv_cache_space_gib, ref_size, engine_gpus > 0,
                    c.learner_num_gpus > 0, logit_positions(cfg, dpo), vocab, published, c.learner_workers,
                    trainable, colocated=c.colocate and not dpo, offload_optimizer=cfg.learner.offload_optimizer)


def adapter_parameters(name_or_path: str, lora, trust_remote_code: bool = False) -> int:
    """Parameters of ``model.lora``'s adapter on the model at ``name_or_path``: ``r * (in + out)`` for every adapted
    linear layer (built on the meta device; 'all-linear' leaves the output layer out, as peft does)."""
    import torch

    model = meta_model(name_or_path, trust_remote_code)
    output = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if lora.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in lora.target_modules:
            total += lora.r * (module.in_features + module.out_features)
    return total


def meta_model(name_or_path: str, trust_remote_code: bool = False):
    """The model at ``name_or_path`` built from its config on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlfleet.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def logit_positions(cfg, dpo: bool) -> int:
    """Completion positions of one learner micro-batch (DPO: its sequences x dpo.max_length, a bound; multi-turn
    episodes: max_turns turns with the environment's messages between them, bounded by model.max_model_len), capped
    at ``learner.logprob_chunk_tokens`` when the learner builds the logits in chunks."""
    gen = cfg.generation
    length = gen.max_completion_length
    if dpo:
        length = cfg.dpo.max_length
    elif gen.max_turns > 1:
        length = cfg.model.max_model_len
    positions = cfg.learner.micro_batch_size * length
    chunk = cfg.learner.logprob_chunk_tokens
    return min(positions, chunk) if chunk > 0 else positions


def memory_problems(need: MemoryEstimate, generators: int, have_gib: float, where: str,
                    options: Callable[[int, float], list[str]] | None = None) -> list[str]:
    """A problem naming the numbers and the fix when the learner and ``generators`` cannot fit ``have_gib``;
    ``options(generators, have_gib)`` (:func:`ways_out`) lists the changes that would fit, with their estimates."""
    total = need.total_gib(generators)
    if total <= have_gib:
        return []
    head = (f"the job needs about {total:.1f} GiB of memory to start (learner {need.learner_gib:.1f} + {generators} "
            f"generators x {need.generator_gib:.1f}, for a {need.params / 1e6:.1f}M-parameter model) but {where} has "
            f"{have_gib:.1f} GiB")
    fits = options(generators, have_gib) if options is not None else []
    if not fits:
        return [f"{head}; lower cluster.num_generators (its min) or generation.kv_cache_space_gib, or use a machine "
                "or cluster with more memory"]
    return [f"{head}. What would fit:" + "".join(f"\n      {o}" for o in fits)
            + f"\n      or a machine or cluster with at least {total:.1f} GiB"]


def ways_out(cfg, with_reference: bool, dpo: bool, generators: int, have_gib: float) -> list[str]:
    """The changes to ``cfg`` that would bring the job within ``have_gib``, each with its estimate, most effective
    first among: a LoRA adapter (r 16, on every linear layer), bfloat16 weights (engine and published copies; the
    learner keeps float32 master weights), both, bfloat16 engines beside a float32 learner (``generation.dtype``), the
    largest KV cache that fits (CPU engines), the most generators that fit (with the smallest KV cache when none fits
    with today's), colocation (one generator, in the learner's process) alone, with the largest KV cache that fits,
    with LoRA and with a bfloat16 engine. Nothing when none of these fits (more memory is the caller's last
    line)."""
    from rlfleet.config import LoraConfig
    from rlfleet.models import torch_dtype

    def changed(**sections) -> object:
        return cfg.model_copy(update={name: getattr(cfg, name).model_copy(update=fields)
                                      for name, fields in sections.items()})

    options: list[tuple[float, str]] = []

    def consider(label: str, variant, gens: int = generators) -> None:
        total = job_estimate(variant, with_reference, dpo).total_gib(gens)
        if total <= have_gib:
            options.append((total, f"{label}: about {total:.1f} GiB"))

    lora = {"lora": LoraConfig(r=16)}
    float32 = torch_dtype(cfg.model.dtype, "cuda" if cfg.cluster.generator_num_gpus else "cpu").itemsize == 4
    if cfg.model.lora is None:
        consider("model.lora: {r: 16} (train an adapter)", changed(model=lora))
    if float32:
        consider("model.dtype: bfloat16", changed(model={"dtype": "bfloat16"}))
    if cfg.model.lora is None and float32:
        consider("model.lora: {r: 16} and model.dtype: bfloat16", changed(model={**lora, "dtype": "bfloat16"}))
    bf16_engine = {"dtype": "bfloat16"}  # the engines only: the learner computes as before
    engines_float32 = float32 and cfg.generation.dtype in ("auto", "float32")
    if engines_float32:
        consider("generation.dtype: bfloat16 (the engines; the learner stays float32)", changed(generation=bf16_engine))
    kv = cfg.generation.kv_cache_space_gib
    if not cfg.cluster.colocate and cfg.cluster.learner_workers == 1 and not dpo:
        colocate = {"colocate": True, "num_generators": 1}
        label = "cluster.colocate: true" + ("" if cfg.cluster.num_generators == 1 else " and cluster.num_generators: 1")
        consider(label, changed(cluster=colocate), gens=1)
        over = job_estimate(changed(cluster=colocate), with_reference, dpo).total_gib(1) - have_gib
        if over > 0 and not cfg.cluster.learner_num_gpus and kv - math.ceil(over) >= 1:  # a CPU engine's cache
            fit = kv - math.ceil(over)
            consider(f"{label} and generation.kv_cache_space_gib: {fit:g}",
                     changed(cluster=colocate, generation={"kv_cache_space_gib": fit}), gens=1)
        if cfg.model.lora is None:
            consider(f"{label} and model.lora: {{r: 16}}", changed(cluster=colocate, model=lora), gens=1)
        if engines_float32:
            consider(f"{label} and generation.dtype: bfloat16", changed(cluster=colocate, generation=bf16_engine),
                     gens=1)
    need = job_estimate(cfg, with_reference, dpo)
    if generators and not cfg.cluster.generator_num_gpus and kv > 1:
        fit = kv - math.ceil((need.total_gib(generators) - have_gib) / generators)
        if fit >= 1:
            consider(f"generation.kv_cache_space_gib: {fit:g}", changed(generation={"kv_cache_space_gib": fit}))
    if generators > 1:
        most = int((have_gib - need.learner_gib) // need.generator_gib)
        if 1 <= most < generators:
            consider(f"cluster.num_generators: {most}", cfg, gens=most)
        elif most < 1 and kv > 1 and not cfg.cluster.generator_num_gpus:  # fewer generators, each with less cache
            small = changed(generation={"kv_cache_space_gib": 1})
            per = job_estimate(small, with_reference, dpo)
            most = int((have_gib - per.learner_gib) // per.generator_gib)
            if 1 <= most < generators:
                consider(f"cluster.num_generators: {most} and generation.kv_cache_space_gib: 1", small, gens=most)
    return [label for _, label in sorted(options, key=lambda o: o[0])]

