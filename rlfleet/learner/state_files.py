"""A learner's optimizer and lr-scheduler state on disk, without pickle: safetensors for tensors, JSON for the rest.

A learner group writes one optimizer file per rank (its FSDP2 shard of every state tensor,
``optimizer-rank<r>-of-<K>.safetensors``); resume needs a group of the same size and says so otherwise. A single
learner writes ``optimizer.safetensors``. Either is read back with ``safetensors`` and ``json`` only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlfleet.learner.distributed import SINGLE, Rank, check_shards, like_shard, local, shard_file


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
