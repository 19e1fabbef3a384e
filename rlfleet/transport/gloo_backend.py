"""A gloo backend for vLLM's RL weight-transfer API, so CPU hosts run the same handshake and engine calls as GPU ones.

vLLM 0.32 ships the weight-sync path RL trainers use (``LLM.init_weight_transfer_engine / start_weight_update /
update_weights / finish_weight_update``; ``vllm.distributed.weight_transfer``) with NCCL and CUDA-IPC backends only.
This module adds ``"gloo"`` to both of vLLM's registries (:func:`register`):

- engine side, :class:`GlooWeightTransferEngine` (``WeightTransferEngineFactory``): joins a gloo process group of
  its own (not the worker's default group) at ``init_transfer_engine``. It *stages*: ``receive_weights`` receives
  the packed buffers into host memory without touching the model, and ``finish_weight_update`` loads them with the
  model's ``load_weights`` inside vLLM's layerwise reload (as vLLM's NCCL engine does in ``receive_weights``). So a
  generator can take part in a broadcast while its engine is generating (the model is not touched) and apply the
  new weights at its next request boundary; a round received before the previous one was applied replaces it;
- trainer side, :class:`GlooTrainerWeightTransferEngine` (``WeightTransferTrainerFactory``): rank 0 opens the
  group, drives the handshake through a ``VLLMWeightSyncClient`` and broadcasts; other trainer ranks only take part
  in gathering sharded parameters (``WeightSource`` iteration).

On the wire: the source's tensors in metadata order, cast to the wire dtype, packed back to back into buffers of at
most ``bucket_bytes`` (a tensor larger than that travels alone), one ``broadcast`` per buffer. Both sides derive the
same buffer boundaries from the metadata in the update info, so nothing but the bytes is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from rlfleet.rendezvous import host_store

BACKEND = "gloo"
DEFAULT_BUCKET_BYTES = 64 * 2**20


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """What an engine needs to join: the trainer's rendezvous, its rank (``rank_offset`` + the worker's rank in its
    engine) and the group's size, the bucket size, and the collective timeout."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side: rank 0 hosts the group's store at ``master_address`` (on a port it picks, then tells the
    engines) and joins at rank 0; engines take ranks 1 .. world_size - 1."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One round's parameters, in the order they travel."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """A gloo process group of its own (not the default group: vLLM's workers and the learner group have theirs),
    over a TCP store that rank 0 hosts (:func:`rlfleet.rendezvous.host_store`)."""
    store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))




def buckets(metas: list[tuple[torch.dtype, tuple[int, ...]]], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``metas`` grouped into buffers of at most ``bucket_bytes`` (in order; a larger tensor alone)."""
    out: list[list[int]] = []
    size = bucket_bytes + 1
    for i, (dtype, shape) in enumerate(metas):
        nbytes = _nbytes(dtype, shape)
        if size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return out


def _nbytes(dtype: torch.dtype, shape) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def broadcast(group: dist.ProcessGroup, buffer: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait()


def receive_round(group: dist.ProcessGroup, update_info: GlooUpdateInfo, bucket_bytes: int
                  ) -> list[tuple[str, torch.Tensor]]:
    """A member's side of one round: every bucket received, as ``(name, tensor)`` views of the buffers."""
    metas = [(getattr(torch, d), tuple(s)) for d, s in zip(update_info.dtype_names, update_info.shapes)]
    received = []
    for bucket in buckets(metas, bucket_bytes):
        buffer = torch.empty(sum(_nbytes(*metas[i]) for i in bucket), dtype=torch.uint8)
        broadcast(group, buffer)
        offset = 0
        for i in bucket:
            dtype, shape = metas[i]
            n = _nbytes(dtype, shape)
            received.append((update_info.names[i], buffer[offset:offset + n].view(dtype).view(shape)))
            offset += n
    return received


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Engine side (inside vLLM's worker): receive each round's buffers and load them through vLLM's layerwise
    reload, as its NCCL engine does."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: dist.ProcessGroup | None = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES
        self.staged: list[tuple[str, torch.Tensor]] = []  # the last round received, not yet loaded

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        p = self.parallel_config
        worker_rank = p.data_parallel_index * p.world_size + p.rank  # unique across data-parallel replicas
        self.bucket_bytes = init_info.bucket_bytes
        self.group = open_group(init_info.master_address, init_info.master_port, init_info.rank_offset + worker_rank,
                                init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        """Nothing to prepare: receiving only stages (see the module docstring)."""

    def finish_weight_update(self) -> None:
        """Load the staged round into the model through vLLM's layerwise reload."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        if not self.staged:
            raise RuntimeError("gloo weight transfer: finish_weight_update without a received round")
        initialize_layerwise_reload(self.model)
        self.model.load_weights(self.staged)
        finalize_layerwise_reload(self.model, self.model_config)
        self.staged = []

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_weight_transfer_engine was not called")
        # whole rounds only: a failed broadcast leaves the previous round staged
        self.staged = receive_round(self.group, update_info, self.bucket_bytes)

    def shutdown(self) -> None:
        self.group = None  # gloo groups close with their last reference


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side. ``send_weights`` (every trainer rank calls it) runs one round: the sender calls the engines'
    ``start_weight_update``, runs their ``update_weights`` concurrently with its broadcast (both meet in the same
    collectives), then ``finish_weight_update``."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool = True,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group: dist.ProcessGroup | None = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        store = host_store(init_info.master_address, init_info.world_size, init_info.timeout_s)  # port: its own
        engines = GlooInitInfo(init_info.master_address, store.port, rank_offset=1,
                               world_size=init_info.world_size, bucket_bytes=init_info.bucket_bytes,
                               timeout_s=init_info.timeout_s)
        # the engines block in init until the whole group has joined: join as rank 0 meanwhile
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(engines))
            engine.group = dist.ProcessGroupGloo(store, 0, init_info.world_size,
                                                 timedelta(seconds=init_info.timeout_s))
            joined.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # take part in the gathers only
                pass
            return
        info = GlooUpdateInfo([m.name for m in meta], [str(m.dtype).removeprefix("torch.") for m in meta],
                              [list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(info))
            self._broadcast(meta)
            received.result()
        finally:
            pool.shutdown(wait=False)  # after a failed broadcast the engines' call never returns: do not join it
        self.client.finish_weight_update()

    def _broadcast(self, meta: list[ParamMeta]) -> None:
        tensors = self._checked(meta)
        for bucket in buckets([(m.dtype, m.shape) for m in meta], self.bucket_bytes):
            parts = [next(tensors).reshape(-1).view(torch.uint8) for _ in bucket]
            broadcast(self.group, parts[0].contiguous() if len(parts) == 1 else torch.cat(parts))

    def _checked(self, meta: list[ParamMeta]) -> Iterator[torch.Tensor]:
        """The source's tensors, each checked against what the engines were told (a mismatch would split the stream
        differently on the two sides)."""
        count = 0
        for (name, tensor), m in zip(self.source, meta):
            if name != m.name or tensor.dtype != m.dtype or tuple(tensor.shape) != m.shape:
                raise ValueError(f"weight source: got {name} {tensor.dtype} {tuple(tensor.shape)}, declared {m.name} "
                                 f"{m.dtype} {m.shape}")
            count += 1
            yield tensor.detach().to("cpu").contiguous()
        if count != len(meta):
            raise ValueError(f"weight source yielded {count} tensors, declared {len(meta)}")

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """Add ``"gloo"`` to vLLM's engine-side and trainer-side registries (idempotent). Call it in the process that
    creates the engine, before ``LLM(...)`` (a vLLM general plugin entry point would do it in every process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, GlooWeightTransferEngine),
                         (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine)):
        try:
            factory.register_engine(BACKEND, cls)
        except ValueError:  # already registered in this process
            pass
