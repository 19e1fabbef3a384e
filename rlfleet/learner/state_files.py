"""A learner's state on disk, without pickle: the policy in Hugging Face format (or its LoRA adapter in peft's),
the optimizer and lr-scheduler state as safetensors for tensors and JSON for the rest; and the state the engines
load (:func:`engine_state`).

A learner group writes one optimizer file per rank (its FSDP2 shard of every state tensor,
``optimizer-rank<r>-of-<K>.safetensors``); resume needs a group of the same size and says so otherwise. A single
learner writes ``optimizer.safetensors``. Either is read back with ``safetensors`` and ``json`` only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlfleet import lora as lora_
from rlfleet.learner import distributed as dist_
from rlfleet.learner.distributed import SINGLE, Rank, check_shards, like_shard, local, shard_file
from rlfleet.models import load_causal_lm


def optimizer_state_to_files(state: dict) -> tuple[dict[str, Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors ``"<param index>.<key>"``, this rank's shard of DTensors; JSON:
    param groups, state keys)."""
    tensors = {f"{i}.{k}": local(v).detach().to("cpu").contiguous() for i, s in state["state"].items()
               for k, v in s.items()}
    keys = {str(i): list(s) for i, s in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "state_keys": keys}


def optimizer_state_from_files(tensors: dict[str, Tensor], meta: dict, params: list[Tensor] | None = None) -> dict:
    """Inverse of :func:`optimizer_state_to_files` (JSON lists back to tuples, e.g. AdamW's ``betas``). With
    ``params`` (the optimizer's parameters in state-dict index order), each tensor shaped like its parameter's
    shard becomes a DTensor sharded like it."""
    def value(i: int, key: str) -> Tensor:
        t = tensors[f"{i}.{key}"]
        p = params[i] if params is not None else None
        return like_shard(t, p) if p is not None and t.shape == local(p).shape and t.dim() else t

    state = {int(i): {k: value(int(i), k) for k in keys} for i, keys in meta["state_keys"].items()}
    groups = [{k: (v if k == "params" or not isinstance(v, list) else tuple(v)) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_optimizer(optimizer: torch.optim.Optimizer, scheduler, path: Path, rank: Rank = SINGLE) -> None:
    """This rank's optimizer shard (``optimizer[-rank<r>-of-<K>].safetensors`` + ``.json``) and, from the leader,
    ``scheduler.json``."""
    tensors, meta = optimizer_state_to_files(optimizer.state_dict())
    save_file(tensors, shard_file(path, "optimizer", rank, "safetensors"))
    shard_file(path, "optimizer", rank, "json").write_text(json.dumps(meta))
    if rank.leader:
        (path / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))


def load_optimizer(optimizer: torch.optim.Optimizer, scheduler, path: Path, rank: Rank = SINGLE) -> None:
    """Restore what :func:`save_optimizer` wrote, for a learner group of the same size (a clear error otherwise)."""
    check_shards(path, "optimizer", rank)
    tensors = load_file(shard_file(path, "optimizer", rank, "safetensors"))  # CPU: AdamW keeps "step" there
    meta = json.loads(shard_file(path, "optimizer", rank, "json").read_text())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.load_state_dict(optimizer_state_from_files(tensors, meta, params))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))


def engine_state(model: torch.nn.Module, lora, rank: Rank, compute_dtype: torch.dtype) -> dict[str, Tensor]:
    """What the engines load: the policy's whole state dict under Hugging Face names, or with ``model.lora`` (``lora``)
    the adapter's tensors under peft's names. ``model.state_dict()`` itself with one rank; with a learner group,
    gathered one tensor at a time in the compute dtype (a collective: every rank calls it, in the same order, and
    every rank gets the tensors)."""
    keep = None if lora is None else lora_.is_adapter_parameter
    if not rank.sharded:
        state = model.state_dict()
        state = state if keep is None else {k: v for k, v in state.items() if keep(k)}
    else:
        state = dist_.full_state_dict(model, compute_dtype, keep=keep)
    return state if lora is None else lora_.adapter_state(state)


class StreamedState:
    """A state dict read once, in order, through :meth:`items` (what an engine's full load reads): each tensor is
    made as it is read, so a reader that drops each one after loading it holds one at a time."""

    def __init__(self, items: Iterator[tuple[str, Tensor]]):
        self._items = items

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return self._items


def engine_state_stream(model: torch.nn.Module, lora, rank: Rank,
                        compute_dtype: torch.dtype) -> dict[str, Tensor] | StreamedState:
    """:func:`engine_state` for an engine in the learner's own process (``cluster.colocate``): a learner group's full
    weights gathered one tensor at a time as the engine loads them (:func:`~rlfleet.learner.distributed.gathered`:
    a collective, every rank's engine reading in the same order), instead of a whole gathered copy on every rank;
    an adapter (megabytes) and a single rank's weights (the parameters themselves) as :func:`engine_state` has them."""
    if lora is not None or not rank.sharded:
        return engine_state(model, lora, rank, compute_dtype)
    return StreamedState(dist_.gathered(model, compute_dtype))


def save_merged(model: torch.nn.Module, peft_model, tokenizer, lora, path: Path, rank: Rank = SINGLE) -> None:
    """Base + adapter merged (``model.lora.save_merged``), in Hugging Face format with the tokenizer; every rank of a
    group calls it. ``model``: the policy with its adapter's layers; ``peft_model``: its peft wrapper."""
    state = lora_.merged_state(dist_.full_state_dict(model, copy=True), lora)
    if rank.leader:
        peft_model.get_base_model().save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)


def save_policy(model: torch.nn.Module, tokenizer, path: Path, rank: Rank = SINGLE,
                state: dict[str, Tensor] | None = None) -> None:
    """``model`` (or ``state``, its weights under its names) and the tokenizer in Hugging Face format, from the
    leader; a learner group gathers the sharded weights first (every rank calls this)."""
    if state is None and rank.sharded:
        state = dist_.full_state_dict(model)
    if rank.leader:
        model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)


def save_adapter(peft_model, tokenizer, path: Path, rank: Rank = SINGLE,
                 state: dict[str, Tensor] | None = None) -> None:
    """The adapter (or ``state``, adapter weights under the model's names) in peft's format
    (``adapter_model.safetensors``, ``adapter_config.json``: loadable with ``PeftModel.from_pretrained(base, path)``)
    and the tokenizer, from the leader; a learner group gathers the adapter's shards first (every rank calls this)."""
    if state is None and rank.sharded:
        state = dist_.full_state_dict(peft_model.get_base_model(), keep=lora_.is_adapter_parameter)
    if rank.leader:
        prefixed = None if state is None else {"base_model.model." + k: v for k, v in state.items()}
        peft_model.save_pretrained(path, state_dict=prefixed)
        tokenizer.save_pretrained(path)


def load_adapter(model: torch.nn.Module, path: Path) -> None:
    """Load the adapter :func:`save_adapter` wrote into ``model`` (peft-wrapped; each rank's shard when sharded).
    Raises naming the file when the checkpoint holds no adapter (written without ``model.lora``)."""
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise ValueError(f"{path}: no adapter_model.safetensors: this checkpoint was written without model.lora (a "
                         "full model); resume it with the same model.lora setting as the run that wrote it")
    saved = load_file(file)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if lora_.is_adapter_parameter(name):
                dist_.local(value).copy_(dist_.shard_of(saved[lora_.peft_name(name)], value))


def load_policy(model: torch.nn.Module, path: Path, trust_remote_code: bool) -> None:
    """Load Hugging Face weights into ``model``; into each rank's shard when it is FSDP-sharded."""
    saved = load_causal_lm(str(path), torch.float32, "cpu", trust_remote_code).state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            dist_.local(value).copy_(dist_.shard_of(saved[name], value))
