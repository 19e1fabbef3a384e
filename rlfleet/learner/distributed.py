"""The pieces of a sharded learner that know about ``torch.distributed``: the process group, FSDP2 sharding, full
tensors out of shards, a batch split across ranks, and per-rank files for sharded state.

A learner group is ``cluster.learner_workers`` processes in one ``torch.distributed`` process group (gloo on CPU,
NCCL on GPU). Each holds an FSDP2 shard (``torch.distributed.fsdp.fully_shard``: every decoder layer, then the whole
model) of the policy, of the frozen reference model and of the optimizer state. The group's arithmetic is that of
one process on the whole batch:

- every rank sees the step's whole batch and computes the loss normaliser of the whole batch itself (no
  collective needed: the batch is a few KB of token ids), then trains on its own rows (:func:`rank_rows`);
- the per-rank losses are already divided by the global normaliser, so their gradients must be *summed* across
  ranks: FSDP2's gradient divide factor is set to 1 (its default averages over the ranks);
- gradient clipping and AdamW act on DTensor shards; ``clip_grad_norm_`` reduces the norm over the group.

With one worker (the default) none of this runs: :data:`SINGLE` is the rank and models stay plain modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from rlfleet.rendezvous import host_store  # noqa: F401 - the learner group's rank 0 hosts its store


@dataclass(frozen=True)
class Rank:
    """This process's place in the learner group."""

    rank: int = 0
    world: int = 1

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


SINGLE = Rank()


def init_process_group(rank: Rank, address: str, port: int, device: torch.device, timeout_s: float,
                       store: dist.TCPStore | None = None) -> None:
    """Join the learner group's process group: gloo on CPU, NCCL on GPU, through the store at ``address:port``
    (``store``: the one this process hosts, :func:`~rlfleet.rendezvous.host_store`). Every collective times out after ``timeout_s``, so
    a rank that died fails the others instead of hanging them (gloo notices a closed peer at once; NCCL after the
    timeout)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(address, port, rank.world, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank.rank, world_size=rank.world, timeout=timeout)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2-shard ``model`` in place over the default process group: each decoder layer (the classes Hugging Face
    lists in ``_no_split_modules``) is its own unit, then the root holds the rest (embeddings, final norm, output
    layer; tied weights stay one parameter). Gradients are summed over the ranks, not averaged (see the module
    docstring)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in layer_classes:
            fully_shard(module)
    # The root too is resharded after each forward (FSDP2 keeps a root unsharded until backward by default): a
    # frozen reference model has no backward, and a no-grad pass (evaluation, proximal log-probs) must not leave the
    # policy's root gathered for the state dict or the optimizer.
    fully_shard(model, reshard_after_forward=True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (an all-gather on every rank for a DTensor: all ranks must call it in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def like_shard(local_tensor: Tensor, param: Tensor) -> Tensor:
    """``local_tensor`` (this rank's shard) as a DTensor sharded like ``param``; unchanged when ``param`` is not
    sharded."""
    if not is_sharded(param):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor.to(param.to_local().device), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride())


def shard_of(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``whole`` as ``like`` (a parameter) is sharded; ``whole`` itself when ``like`` is not a
    DTensor. No communication: every rank holds ``whole``."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.to_local().device), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def full_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None, copy: bool = False,
                    keep: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """The model's whole state dict (or its tensors whose names ``keep`` accepts), one tensor at a time (each
    gathered, then cast to ``dtype`` at once, so the peak is one float32 tensor beyond the result). A collective in
    a learner group: every rank calls it and gets the tensors. Tied parameters come back as one tensor under both
    names. ``copy``: tensors never share memory with the model (with one rank, ``state_dict()`` itself does)."""
    return dict(gathered(model, dtype, copy, keep))


def gathered(model: torch.nn.Module, dtype: torch.dtype | None = None, copy: bool = False,
             keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Tensor]]:
    """:func:`full_state_dict`'s ``(name, tensor)`` pairs, each gathered as it is asked for: a consumer that drops
    each tensor once it has used it (an engine loading them) holds one gathered tensor at a time, not the whole
    model; only tied tensors are kept until their last name. A collective in a learner group: every rank must
    consume the whole iterator, in order."""
    state = {name: value for name, value in model.state_dict().items() if keep is None or keep(name)}
    last_use: dict[tuple, str] = {}
    for name, value in state.items():
        last_use[(local(value).data_ptr(), tuple(value.shape))] = name  # tied names share the (local) storage
    seen: dict[tuple, Tensor] = {}
    for name, value in state.items():
        key = (local(value).data_ptr(), tuple(value.shape))
        tensor = seen.get(key)
        if tensor is None:
            tensor = full(value.detach())
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if copy and tensor.data_ptr() == local(value).data_ptr():  # one rank, float32: the parameter itself
                tensor = tensor.clone()
        seen[key] = tensor
        if last_use[key] == name:
            del seen[key]
        yield name, tensor


def rank_rows(num_rows: int, rank: Rank) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a ``num_rows`` batch for ``rank``: consecutive slices of ``ceil(num_rows /
    world)`` rows (the last may be shorter or empty; :func:`rows_per_rank` is what every rank pads to)."""
    per = rows_per_rank(num_rows, rank.world)
    start = min(rank.rank * per, num_rows)
    return start, min(start + per, num_rows)


def rows_per_rank(num_rows: int, world: int) -> int:
    return -(-num_rows // world)


def all_reduce_sum(values: list[float], rank: Rank) -> list[float]:
    """Sums of ``values`` over the group (float64); the values themselves with one rank."""
    if not rank.sharded:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def shard_file(path: Path, stem: str, rank: Rank, suffix: str) -> Path:
    """``<stem>.<suffix>`` for one rank, ``<stem>-rank<r>-of-<K>.<suffix>`` for a rank of K > 1."""
    if not rank.sharded:
        return path / f"{stem}.{suffix}"
    return path / f"{stem}-rank{rank.rank}-of-{rank.world}.{suffix}"


def check_shards(path: Path, stem: str, rank: Rank) -> None:
    """Refuse a checkpoint written by a learner group of another size (resharding is not supported)."""
    mine = shard_file(path, stem, rank, "safetensors")
    if mine.exists():
        return
    found = sorted(p.name for p in path.glob(f"{stem}*.safetensors"))
    raise ValueError(
        f"{path}: this learner has cluster.learner_workers={rank.world}, but the checkpoint holds {found or 'no'} "
        f"{stem} state files (written by a learner group of another size); resume with the learner_workers the run "
        "had (resharding optimizer state is not supported)")


@dataclass(frozen=True)
class MicroBatch:
    """Rows ``[start, stop)`` of the step's whole batch. ``real`` is False for a filler: a rank with fewer rows than
    the others still runs as many forward and backward passes (FSDP's collectives are per pass), on a copy of real
    rows whose loss is multiplied by 0, so it adds exactly nothing."""

    start: int
    stop: int
    real: bool = True


def micro_batches(num_rows: int, size: int, rank: Rank = SINGLE) -> list[MicroBatch]:
    """This rank's micro-batches of at most ``size`` rows, padded with fillers to the count of the fullest rank.
    One rank: ``[0, size), [size, 2 size), ...`` over the whole batch."""
    start, stop = rank_rows(num_rows, rank)
    mine = [MicroBatch(i, min(i + size, stop)) for i in range(start, stop, size)]
    count = -(-rows_per_rank(num_rows, rank.world) // size)
    return mine + [MicroBatch(0, min(size, num_rows), real=False)] * (count - len(mine))


def broadcast_object(value, rank: Rank):
    """Rank 0's ``value`` on every rank (``value`` itself with one rank): what rank 0 pulled for the whole group (a
    batch of groups); the bytes stay inside the process group."""
    if not rank.sharded:
        return value
    box = [value if rank.leader else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value, rank: Rank) -> list:
    """``value`` from every rank, in rank order (``[value]`` with one rank): small picklable values only (metrics);
    the bytes stay inside the process group."""
    if not rank.sharded:
        return [value]
    out = [None] * rank.world
    dist.all_gather_object(out, value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# A group of local processes without Ray (tests and benchmarks; jobs start their ranks as Ray actors)
# ----------------------------------------------------------------------------------------------------------------


def _spawned_rank(r: int, world: int, port: int, device: str, queue, fn, args) -> None:
    import traceback

    rank = Rank(r, world)
    try:
        local_device = torch.device(f"cuda:{r}") if device == "cuda" else torch.device("cpu")
        init_process_group(rank, "127.0.0.1", port, local_device, 300)
        out = fn(rank, *args)
        queue.put((r, "ok", out))
    except BaseException:  # noqa: BLE001 - reported by spawn_group
        queue.put((r, "error", traceback.format_exc()))
    finally:
        destroy_process_group()


def spawn_group(world: int, fn, *args, device: str = "cpu", timeout_s: float = 900) -> list:
    """``fn(rank, *args)`` on ``world`` spawned local processes forming one process group (gloo on CPU; NCCL with
    ``device="cuda"``, rank r on GPU r); every rank's result, in rank order. ``fn`` must be importable (a module's
    top-level function). Raises with the failing rank's traceback."""
    import multiprocessing

    store = host_store("127.0.0.1", world, 300)  # held here until the ranks are done
    port = store.port
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spawned_rank, args=(r, world, port, device, queue, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            r, status, out = queue.get(timeout=timeout_s)
            if status != "ok":
                raise RuntimeError(f"rank {r} of {world} failed:\n{out}")
            results[r] = out
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
