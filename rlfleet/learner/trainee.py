"""The trainee: what every learner trains, whatever its objective.

One :class:`Trainee` holds the policy (float32 master weights, optionally a LoRA adapter on a frozen base), its
reference, the tokenizer, this rank's place in a learner group (FSDP2), AdamW with its lr schedule, and the one
checkpoint layout. The objectives (:mod:`rlfleet.learner.policy`, :mod:`rlfleet.dpo.learner`,
:mod:`rlfleet.dpo.online`) turn micro-batches into losses on top of it; :class:`~rlfleet.learner.core.Learner` runs
the step.

The reference (``reference=``):

- ``None``: none (the loss has no KL or DPO term);
- ``"load"``: the model loaded again from ``model.name_or_path`` in the compute dtype, frozen (GRPO with beta > 0);
- ``"copy"``: a frozen copy of the policy as built (adapter layers included) in the compute dtype, whose values an
  objective may replace (DPO; BEMA refreshes it), so it is checkpointed;
- ``"adapter_off"``: the policy with its LoRA adapter disabled, the base model, no second copy of the weights.

Parameters are float32; when ``model.dtype`` resolves to bfloat16/float16 (a GPU with "auto") the forward passes
run under autocast in that dtype (AdamW updates of ~1e-6 on bfloat16 weights of magnitude ~1e-2 round away), and
the engines get the weights cast to it. Dropout is off and nothing is drawn at random, so steps are deterministic.
With ``learner.offload_optimizer``, a learner on a GPU keeps AdamW's moments in host memory between steps
(:func:`move_optimizer_state`), freeing twice the trained weights' size for a colocated engine while it samples.

Checkpoint layout (:meth:`Trainee.save_policy`, :meth:`Trainee.save_state`; the learner writes ``learner.json``)::

    step-N/policy/    the policy (Hugging Face format, or the adapter in peft's) and the tokenizer: what users load
    step-N/learner/   optimizer (one file per rank in a group), scheduler.json, reference (kind "copy"), the
                      objective's files (BEMA), learner.json (versions, steps, the objective's counters)

:func:`locate` also finds the learner's files in the three layouts rlfleet wrote before this one.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlfleet import lora as lora_
from rlfleet.config import LearnerConfig, ModelConfig
from rlfleet.learner import distributed as dist_
from rlfleet.learner.distributed import SINGLE, Rank
from rlfleet.learner.logprobs import check_packing, completion_logprobs, shard_for_learning
from rlfleet.learner.state_files import (engine_state, engine_state_stream, load_adapter, load_optimizer, load_policy,
                                         save_adapter, save_merged, save_optimizer, save_policy)
from rlfleet.models import float32_attention_on_cpu, load_causal_lm, load_tokenizer, torch_dtype

REFERENCES = (None, "load", "copy", "adapter_off")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak lr at 0-based scheduler step ``step`` (Hugging Face's schedules).

    Warmup: step / warmup_steps for step < warmup_steps (so 0 at step 0). Then, with
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps): constant 1; linear max(0, 1 - progress);
    cosine 0.5 * (1 + cos(pi * min(progress, 1))).
    """
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"learner.lr_scheduler_type: unknown schedule {schedule!r}; use constant, linear or cosine")


def make_optimizer(params, cfg: LearnerConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with ``cfg``'s lr, betas and weight decay, and its lr schedule (:func:`lr_factor`)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    schedule = partial(lr_factor, schedule=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps,
                       max_steps=cfg.max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move AdamW's per-parameter state (its two moments; a sharded learner's are DTensors, moved shard by shard) to
    ``device``, in place. ``step`` stays where the optimizer keeps it (the host, unless capturable or fused). The copies
    are synchronous (pageable host memory), so a device's memory is free on return."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "step" or not isinstance(value, Tensor) or value.device == device:
                continue
            state[key] = value.to(device)


def prepare_for_training(model: torch.nn.Module, gradient_checkpointing: bool) -> None:
    """Dropout off (the loss compares log-probs with the engine's, which has none), optional gradient
    checkpointing, train mode (HF applies gradient checkpointing in train mode only)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A gradient-free eval-mode copy with its parameters (not its buffers: rotary frequencies stay float32) cast to
    ``dtype``; tied parameters stay tied."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    for p in ref.parameters():
        p.data = p.data.to(dtype)
    return ref


# ----------------------------------------------------------------------------------------------------------------
# Where a checkpoint keeps the learner's files
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where one checkpoint keeps the policy and the learner's state, and which layout wrote it."""

    policy: Path
    state: Path
    kind: str  # "v2" (this one), or the layouts before it: "grpo", "dpo", "online_dpo"

    def counters(self) -> dict:
        """``learner.json`` as this layout wrote it, in today's terms: ``policy_version`` (learner steps,
        publications), ``step`` (optimizer steps) and the objective's own keys. Before v2, DPO wrote only ``step``
        and online DPO its versions in ``online.json``."""
        state = json.loads((self.state / "learner.json").read_text())
        if (self.state / "online.json").is_file():
            state |= json.loads((self.state / "online.json").read_text())
        state.setdefault("policy_version", state["step"])
        return state


def locate(step_dir: str | Path) -> Layout:
    """The learner's files in checkpoint ``step_dir`` (``step-N/``), in today's layout or one of the three before it:
    GRPO's ``policy/`` (model, optimizer and ``learner.json`` together), ``rlfleet dpo``'s ``learner/`` (its
    ``policy/`` inside), online DPO's ``policy/`` (its ``policy/`` inside, and ``online.json``)."""
    d = Path(step_dir)
    if (d / "learner" / "learner.json").is_file():
        return Layout(d / ("policy" if (d / "policy").is_dir() else "learner/policy"), d / "learner",
                      "v2" if (d / "policy").is_dir() else "dpo")
    if (d / "policy" / "policy").is_dir():
        return Layout(d / "policy" / "policy", d / "policy", "online_dpo")
    if (d / "policy" / "learner.json").is_file():
        return Layout(d / "policy", d / "policy", "grpo")
    raise ValueError(f"{d} holds no learner checkpoint (no learner/learner.json, policy/learner.json or "
                     "policy/policy/)")


# ----------------------------------------------------------------------------------------------------------------
# The trainee
# ----------------------------------------------------------------------------------------------------------------


class Trainee:
    """The policy, its reference, the tokenizer, AdamW and its lr schedule on this rank (see the module doc).

    ``model``: an already-built policy (e.g. with frozen parameters), used as is; default: ``model_cfg``'s model
    loaded in float32.
    """

    def __init__(self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, seed: int = 0, rank: Rank = SINGLE,
                 reference: str | None = None, model: torch.nn.Module | None = None):
        if reference not in REFERENCES:
            raise ValueError(f"reference: unknown kind {reference!r}; use one of {REFERENCES}")
        self.model_cfg, self.cfg, self.seed, self.rank = model_cfg, learner_cfg, seed, rank
        self.device = resolve_device(learner_cfg.device)
        self.compute_dtype = torch_dtype(model_cfg.dtype, self.device.type)
        self.tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code)
        load_on = "cpu" if rank.sharded else str(self.device)  # fully_shard moves only this rank's shard
        if model is None:
            model = load_causal_lm(model_cfg.name_or_path, torch.float32, load_on, model_cfg.trust_remote_code)
        self.model = model if rank.sharded else model.to(self.device)
        float32_attention_on_cpu(self.model, self.compute_dtype, self.device)  # before a copy is made of it
        if learner_cfg.pack_sequences:
            check_packing(self.model)
        self.lora = model_cfg.lora
        self.peft = None if self.lora is None else lora_.add_adapter(self.model, self.lora, seed)  # frozen base
        prepare_for_training(self.model, learner_cfg.gradient_checkpointing)
        if reference == "adapter_off" and self.peft is None:
            raise ValueError("reference 'adapter_off' needs model.lora (the policy's adapter to disable)")
        self.reference = reference
        self.ref_model = None
        if reference == "load":
            self.ref_model = load_causal_lm(model_cfg.name_or_path, self.compute_dtype, load_on,
                                            model_cfg.trust_remote_code).eval().requires_grad_(False)
            float32_attention_on_cpu(self.ref_model, self.compute_dtype, self.device)
        elif reference == "copy":
            self.ref_model = frozen_copy(self.model, self.compute_dtype)
        if rank.sharded:  # after gradient checkpointing is set up, before the optimizer sees the parameters
            shard_for_learning(self.model)
            if self.ref_model is not None:
                shard_for_learning(self.ref_model)
        self.optimizer, self.scheduler = make_optimizer([p for p in self.model.parameters() if p.requires_grad],
                                                        learner_cfg)
        # learner.offload_optimizer: AdamW's moments live in host memory between steps (a learner on the host has
        # nothing to move)
        self.offload_optimizer = learner_cfg.offload_optimizer and self.device.type != "cpu"

    # -- forward passes ----------------------------------------------------------------------------------------

    def logprobs(self, model: torch.nn.Module, batch, temperature: float) -> Tensor:
        """``[B, T]`` completion log-probs of ``model`` (the policy, or the reference's module), under autocast
        when the compute dtype is not float32 (:func:`~rlfleet.learner.logprobs.completion_logprobs`)."""
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            return completion_logprobs(model, batch, temperature, self.cfg.logprob_chunk_tokens,
                                       self.cfg.pack_sequences)

    @contextmanager
    def as_reference(self):
        """Inside, the module whose log-probs are the reference's (no gradient)."""
        with torch.no_grad(), (self.peft.disable_adapter() if self.reference == "adapter_off" else nullcontext()):
            yield self.model if self.reference == "adapter_off" else self.ref_model

    def trainable(self) -> dict[str, Tensor]:
        """The policy's parameters with ``requires_grad``, by name (tied parameters once); this rank's shards in a
        learner group."""
        return {name: dist_.local(p) for name, p in self.model.named_parameters() if p.requires_grad}

    def optimizer_step(self) -> float:
        """Clip the gradient (``learner.max_grad_norm``), one AdamW step, zero the gradient. Returns the norm before
        clipping, over every rank's shard."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = dist_.full(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or math.inf))
        if self.offload_optimizer:
            move_optimizer_state(self.optimizer, self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.offload_optimizer:
            move_optimizer_state(self.optimizer, torch.device("cpu"))
        return grad_norm.item()

    @torch.no_grad()
    def load_reference(self, weights: dict[str, Tensor]) -> None:
        """Copy ``weights`` (a subset of the parameter names; this rank's shards) into the reference (kind "copy"),
        cast to its dtype."""
        params = dict(self.ref_model.named_parameters())
        for name, value in weights.items():
            dist_.local(params[name]).copy_(value)

    def engine_state(self) -> dict[str, Tensor]:
        """What the engines load: :func:`~rlfleet.learner.state_files.engine_state` (a collective in a group)."""
        return engine_state(self.model, self.lora, self.rank, self.compute_dtype)

    def engine_state_stream(self):
        """:func:`~rlfleet.learner.state_files.engine_state_stream`: for an engine in this process."""
        return engine_state_stream(self.model, self.lora, self.rank, self.compute_dtype)

    # -- files -------------------------------------------------------------------------------------------------

    def save_policy(self, path: Path, state: dict[str, Tensor] | None = None) -> None:
        """The policy (or ``state``, weights under its names) in Hugging Face format, or its adapter in peft's, with
        the tokenizer; every rank of a group calls it."""
        if self.peft is None:
            save_policy(self.model, self.tokenizer, path, self.rank, state)
        else:
            save_adapter(self.peft, self.tokenizer, path, self.rank, state)

    def save_state(self, path: Path) -> None:
        """The optimizer (one file per rank), ``scheduler.json`` and, for a reference of kind "copy", its
        parameters (``reference[-rank<r>-of-<K>].safetensors``)."""
        save_optimizer(self.optimizer, self.scheduler, path, self.rank)
        if self.reference == "copy":
            save_file({n: dist_.local(p).detach().to("cpu").contiguous() for n, p in self.ref_model.named_parameters()},
                      dist_.shard_file(path, "reference", self.rank, "safetensors"))

    def load(self, layout: Layout) -> None:
        """Restore what :meth:`save_policy` and :meth:`save_state` wrote (any layout :func:`locate` finds), with
        no unpickling; checkpoints of early versions (``optimizer.pt``) are read with ``weights_only=True``."""
        if self.peft is None:
            load_policy(self.model, layout.policy, self.model_cfg.trust_remote_code)
        else:
            load_adapter(self.model, layout.policy)
        if (layout.state / "optimizer.pt").exists() and not self.rank.sharded:
            self.optimizer.load_state_dict(torch.load(layout.state / "optimizer.pt", map_location=self.device,
                                                      weights_only=True))
            self.scheduler.load_state_dict(torch.load(layout.state / "scheduler.pt", weights_only=True))
        else:
            load_optimizer(self.optimizer, self.scheduler, layout.state, self.rank)
        if self.offload_optimizer:  # load_state_dict puts the state on the parameters' device
            move_optimizer_state(self.optimizer, torch.device("cpu"))
        if self.reference == "copy":
            dist_.check_shards(layout.state, "reference", self.rank)
            saved = load_file(dist_.shard_file(layout.state, "reference", self.rank, "safetensors"))
            names = [n for n, _ in self.ref_model.named_parameters()]
            if sorted(saved) != sorted(names):
                raise ValueError(f"{layout.state}: the reference file's parameter names differ from the reference "
                                 "model's")
            self.load_reference(saved)

    def save_merged(self, directory: str | Path) -> None:
        """Base + adapter merged (``model.lora.save_merged``), Hugging Face format; every rank calls it."""
        save_merged(self.model, self.peft, self.tokenizer, self.lora, Path(directory), self.rank)
