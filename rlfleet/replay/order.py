"""Request order (``replay.consume_order: request``): groups are released for training in the order their requests
were made, whatever order the generators finish in. Pure.

The driver numbers its training requests 0, 1, 2, ... (``seq``). Each request ends in exactly one of two ways: its
generator delivers its groups (possibly none: all dropped) with its number, or the driver learns that it was lost
with its generator and skips it. :class:`RequestOrder` holds a delivery until every earlier request has ended, then
releases it, so groups reach the replay FIFO in request order and no request is ever overtaken. Admission then needs
only the current version (:mod:`rlfleet.cluster.admission`), which is what lets a second generator work at
``max_staleness: 1``.

The first word on a request wins: a delivery after its skip (the actor's ``add`` raced the driver's notice of its
death), or a second delivery, is ignored and counted; the driver re-issues a lost request's prompts in a new
request, so nothing is lost either way.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class RequestOrder(Generic[T]):
    """Deliveries keyed by request number in, deliveries in request order out."""

    def __init__(self, next_seq: int = 0):
        self.next_seq = next_seq  # the first request that has not ended
        self._ended: dict[int, list[T]] = {}  # later requests that have ended: their items, or [] when skipped
        self.ignored = 0  # deliveries or skips of requests that had already ended

    @property
    def held(self) -> int:
        """Items delivered and waiting for an earlier request to end."""
        return sum(len(items) for items in self._ended.values())

    def deliver(self, seq: int, items: list[T]) -> list[T]:
        """Request ``seq`` delivered ``items``; returns every item now released, in request order."""
        return self._end(seq, list(items))

    def skip(self, seq: int) -> list[T]:
        """Request ``seq`` will never deliver (lost with its generator); returns the items this releases."""
        return self._end(seq, [])

    def _end(self, seq: int, items: list[T]) -> list[T]:
        if seq < self.next_seq or seq in self._ended:
            self.ignored += 1
            return []
        self._ended[seq] = items
        released: list[T] = []
        while self.next_seq in self._ended:
            released += self._ended.pop(self.next_seq)
            self.next_seq += 1
        return released
