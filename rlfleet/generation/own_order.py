"""A continuous generator's requests in the order the driver queued them, for the requests that must *follow* them.

A continuous engine runs its requests side by side, so their groups reach the replay actor in any order, and
admission counts the generator's own requests in the oldest version in flight (:mod:`rlfleet.cluster.admission`).
At ``replay.max_staleness: 1`` that admits nothing while the generator's previous request runs: the next one is
queued only once the driver has heard the last group of the one before, and the engine idles for that turn-around
(the replay's ack, the driver's admission, the call: 20-45 ms a step on a CPU, bench/RESULTS.md section 22).

A request that *follows* is admitted as a batched engine's is, the generator's own requests left out of the oldest
version in flight, because it keeps their order: it starts once every request queued before it on the generator has
sampled its last token (the engine runs one batch, the next queued behind it, as a batched engine does, with no
turn-around), and hands its first group on only once every one of them has handed on its last (which is what the
bound needs). The driver numbers each member's requests (``ordinal``, never reused, restarts included) and names,
with each, the lowest ordinal it has not yet heard the end of (``low``): every request below it has ended, on this
process or on one that died, so a process restarted in between never waits for requests it will not see.

Nothing here is timed: a follower waits on the ends of its predecessors, under ``timeout_s``. A follower waiting for a
request that went to a process that died waits out ``timeout_s``; the driver has then lost it with the rest of the
member's requests and fenced it at the replay actor, so nothing it could still deliver is trained.
"""

from __future__ import annotations

import threading


class Floor:
    """A set of ordinals seen to have passed a point, kept as the lowest not yet passed and the ones above it."""

    def __init__(self):
        self.floor, self._above = 0, set()

    def add(self, ordinal: int) -> None:
        if ordinal >= self.floor:
            self._above.add(ordinal)
        self._advance()

    def raise_to(self, low: int) -> None:
        """Every ordinal below ``low`` has passed (the driver heard them end)."""
        if low > self.floor:
            self.floor = low
            self._above = {o for o in self._above if o >= low}
        self._advance()

    def _advance(self) -> None:
        while self.floor in self._above:
            self._above.remove(self.floor)
            self.floor += 1


class OwnOrder:
    """Where each of a generator's requests (by ``ordinal``) stands: sampled (its last token) and finished (its last
    group handed on). Thread-safe: each request runs on a thread of the actor's ``stream`` concurrency group."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._changed = threading.Condition()
        self._sampled, self._finished = Floor(), Floor()

    def begin(self, ordinal: int, low: int, follows: bool) -> None:
        """Request ``ordinal`` arrives; the driver has heard the end of every request below ``low``. A follower
        returns once every request before it has sampled its last token."""
        with self._changed:
            self._sampled.raise_to(low)
            self._finished.raise_to(low)
            self._changed.notify_all()
        if follows:
            self._wait(self._sampled, ordinal, "sampled its last token")

    def sampled(self, ordinal: int) -> None:
        """Request ``ordinal`` sampled its last token: a follower may start."""
        with self._changed:
            self._sampled.add(ordinal)
            self._changed.notify_all()

    def before_handing_on(self, ordinal: int) -> None:
        """A follower's groups go to the replay actor only after every earlier request's."""
        self._wait(self._finished, ordinal, "handed on its last group")

    def finished(self, ordinal: int) -> None:
        """Request ``ordinal`` ended (its groups handed on, or it failed): nothing of it can reach the replay actor
        after a follower's."""
        with self._changed:
            self._sampled.add(ordinal)
            self._finished.add(ordinal)
            self._changed.notify_all()

    def _wait(self, floor: Floor, ordinal: int, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: floor.floor >= ordinal, self.timeout_s):
                raise TimeoutError(f"request {ordinal} follows the generator's earlier requests, and request "
                                   f"{floor.floor} has not {what} within cluster.timeout_s={self.timeout_s:g} s")
