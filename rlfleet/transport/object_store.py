"""Weights through Ray's object store: the state dict packed into one host buffer (:mod:`rlfleet.transport.packed`),
one ``ray.put`` by the learner, a zero-copy read of shared memory by every generator on the same node."""

from __future__ import annotations

from collections.abc import Mapping

import ray
from torch import Tensor

from rlfleet.transport import CAPABILITIES, FULL, Contents, WeightHandle, WeightLoader
from rlfleet.transport.packed import WeightPacker, unpack

NAME = "object_store"


class ObjectStorePublisher:
    """Packs into one reusable buffer (warm pages; the copy doubles as the cast to the engines' dtype and the
    device-to-host transfer) and puts it: one copy into the object store per publication."""

    capabilities = CAPABILITIES[NAME]

    def __init__(self, dtype, contents: Contents = FULL):
        self.packer = WeightPacker(dtype)
        self.contents = contents

    def connect(self, members: list[str]) -> None:
        """Nothing: any generator can read a publication from the object store."""

    def publish(self, state: Mapping[str, Tensor], version: int) -> WeightHandle:
        return WeightHandle(NAME, int(version), ray.put(self.packer.pack(state)), contents=self.contents)

    def stats(self) -> dict[str, float]:
        return {}


class ObjectStoreReceiver:
    """Nothing to keep between calls: every publication stays in the object store while its handle lives."""

    def fetch(self, handle: WeightHandle, timeout_s: float) -> None:
        """Pull the packed buffer into this node's object store (nothing to do on the learner's node): a generator
        on another node then loads from local shared memory, the transfer having overlapped its generation."""
        ray.wait([handle.payload], timeout=timeout_s, fetch_local=True)

    def apply(self, handle: WeightHandle, engine: WeightLoader) -> int:
        packed = ray.get(handle.payload)  # a read-only view of this node's shared memory (fetched there if need be)
        engine.load_weights(unpack(packed), handle.version, handle.contents)
        return engine.version

    def join(self, init_info: dict, engine) -> None:
        raise RuntimeError(f"cluster.weight_transport {NAME!r} has no weight-transfer group to join")

    def receive(self, update_info: dict, version: int, engine) -> None:
        raise RuntimeError(f"cluster.weight_transport {NAME!r} pushes no rounds: a generator reads a publication "
                           "from its handle")
