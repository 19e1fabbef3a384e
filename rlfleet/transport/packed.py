"""A state dict packed into one contiguous byte buffer: the form in which the learner publishes weights.

Ray serialises a numpy array out of band: ``ray.put`` writes its bytes into the object store in one copy, and
``ray.get`` on the same node returns a read-only view of shared memory, no copy and no unpickling of tensors. A plain
dict of torch tensors takes the slow road instead (each tensor pickled, its bytes copied on put and again on get),
which measured about twice as slow end to end for a 100M-parameter model (``bench/weight_sync.py``).

The learner keeps one :class:`WeightPacker` and packs into the same buffer at every publication (warm pages; the
copy doubles as the cast to the compute dtype and the device-to-host transfer); a generator :func:`unpack`\\ s the
resolved object into tensor views and hands them to its engine, which copies them into its own parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ALIGN = 64  # byte alignment of every tensor in the buffer (any dtype's itemsize divides it)


@dataclass(frozen=True)
class Slot:
    """Where one named tensor lives in the buffer. Tied tensors share an offset."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes


@dataclass(frozen=True)
class PackedWeights:
    """``buffer`` (uint8 [nbytes]) holds every tensor of ``slots`` at its offset."""

    buffer: np.ndarray
    slots: tuple[Slot, ...]

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


class WeightPacker:
    """Packs state dicts of one fixed structure into a buffer it owns and reuses.

    The layout is fixed by the first call: the same names, shapes and storage sharing in every later call (a model
    does not change shape during training). Tensors sharing storage (tied embeddings) are stored once.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffer: np.ndarray | None = None
        self.slots: tuple[Slot, ...] = ()

    def _layout(self, state: Mapping[str, Tensor]) -> None:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        offsets: dict[tuple, int] = {}
        slots, end = [], 0
        for name, t in state.items():
            key = (t.data_ptr(), tuple(t.shape), t.stride())
            if key not in offsets:
                offsets[key] = end
                end += -(-t.numel() * itemsize // ALIGN) * ALIGN
            slots.append(Slot(name, str(self.dtype).removeprefix("torch."), tuple(t.shape), offsets[key]))
        self.buffer = np.zeros(max(end, 1), dtype=np.uint8)
        self.slots = tuple(slots)

    def pack(self, state: Mapping[str, Tensor]) -> PackedWeights:
        """Copy ``state`` (any device and float dtype) into the buffer in ``dtype``; returns the packed view.

        The result aliases the packer's buffer: ``ray.put`` it (a copy) before the next ``pack``.
        """
        if self.buffer is None:
            self._layout(state)
        elif [s.name for s in self.slots] != list(state):
            raise ValueError("WeightPacker: the state dict's names changed since the first pack")
        flat = torch.from_numpy(self.buffer)
        done: set[int] = set()
        with torch.no_grad():
            for slot, t in zip(self.slots, state.values()):
                if slot.offset in done:
                    continue
                done.add(slot.offset)
                _view(flat, slot).copy_(t.detach())
        return PackedWeights(self.buffer, self.slots)


def _view(flat: Tensor, slot: Slot) -> Tensor:
    dtype = getattr(torch, slot.dtype)
    numel = int(np.prod(slot.shape, dtype=np.int64))
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return flat[slot.offset:slot.offset + nbytes].view(dtype).view(slot.shape)


def unpack(packed: PackedWeights) -> dict[str, Tensor]:
    """Tensor views of ``packed.buffer`` by name (no copy). From ``ray.get`` the buffer is read-only shared memory:
    read the tensors, never write them, and drop them once loaded so the object store can free the object."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(packed.buffer)
    return {slot.name: _view(flat, slot) for slot in packed.slots}
