"""Admission control: how many groups the driver may request now without breaking the staleness bound. Pure.

The learner trains on fresh groups in the order they reach the replay actor, ``groups_per_step`` (g) per step;
the batch it takes at version v (its ``b``-th, counting from 0, is taken at version ``b``) is trained at version v.
A group sampled at version ``s`` and trained at version ``t`` has staleness ``t - s``; ``replay.max_staleness``
(S) bounds it.

Call a group *live* from the moment it is requested until it is known never to reach training (dropped by a
generator or the replay actor, or lost with a generator that died): live groups are trained, queued, or being
generated. A new group is consumed after at most every group that was live when it was requested, plus groups
requested later that reach the replay actor before it. So if every request made at version ``V`` keeps

    live + m <= (min(V, oldest version still being generated) + 1 + S) * g

then a group requested at ``V`` is among the first ``(V + 1 + S) * g`` groups consumed, i.e. in batch ``V + S`` at
the latest, trained at version ``<= V + S``: staleness ``<= S``. The minimum over versions still being generated is
what keeps a slow request's groups from being pushed back by faster later ones (with ``V`` alone, a request made at
a higher version could fill the slots an older, slower one counted on: the property test finds such orders).

Only requests that can overtake the new one count in that minimum: those on *other* generators. A generator runs
its requests in the order they were queued (Ray runs a single-threaded actor's calls in submission order, and a
generate() returns only once the replay actor has its groups), so a request queued behind another on the same
generator never reaches the replay actor first. Counting the generator's own queue would forbid exactly the
pipelining that keeps its engine busy: with ``S = 1`` and one generator, the next request could never be queued
while one is generating. (The simulator in ``tests/test_admission.py`` checks the bound with the rule as stated, and
finds violations when a generator's requests may arrive out of order.)

A continuous engine's requests run side by side and finish in any order, so its own count in that minimum: at
``S = 1`` nothing more is admitted on a generator until the last group of its previous request is heard, and its
engine idles for the turn-around. Where the bound admits nothing that way, a request may instead *follow* the
generator's own (:mod:`rlfleet.generation.own_order`): it starts once they have sampled their last tokens and
hands its groups on only after theirs, so they cannot be overtaken by it and are left out of its minimum, as a
batched engine's queue is. A request queued later that starts at once may overtake a follower; it counts the
follower's version in its own minimum, which is what keeps the follower's groups within the bound. The rule holds
at every ``S``; the driver uses it at ``S = 1`` only, where a generator runs one batch at a time anyway
(``GeneratorPool``'s ``follow``). (``tests/test_admission.py`` checks the bound with followers, and finds
violations when they hand on out of order.)

**Request order** (``replay.consume_order: request``). The minimum is the price of consuming groups in arrival
order: at ``S = 1`` it holds a second generator back while the first generates (the first's request is the
oldest in flight, and a new one on the other generator could overtake it), so two generators rarely generate at
once. In request order the replay actor releases a request's groups only once every earlier request has delivered
or been lost (:mod:`rlfleet.replay.order`): no group requested later reaches the FIFO first, on any generator, so
``oldest_in_flight`` is None and the bound is taken at ``V`` itself. (``tests/test_admission.py`` checks it with
requests finishing in any order, and finds violations without the reordering.)

**The token unit** (``replay.staleness_unit: token``, continuous engines). Under the group unit the window holds
the batch being trained and the groups generating, and a long-tailed group's straggler holds it at its own version
until it ends: at ``S = 1`` only ``g`` groups generate while the learner steps, mostly finished completions waiting
for their stragglers, and the engine's batch drains. Under the token unit the bound is kept where the tokens are
trained instead: the learner masks every token sampled more than ``S`` versions before its step, and the replay
actor drops a group none of whose tokens is left. So the window need not count the groups still generating, and
its depth is a matter of waste, not of the bound: the budget is taken at ``V`` itself (``oldest_in_flight`` None)
over the *settled* groups (trained, queued or being trained: ``live`` less those generating) with a window of two
batches at most (``min(S, 1)`` in place of ``S``: the batch being trained and the next; a finished group queued
behind more only ages, and its tokens are masked), and the groups generating are capped by each generator's
``generation.max_inflight_groups`` (default one window, ``(S + 1) * g``). A larger cap fills the engine further at
the price of more masked tokens.
(``tests/test_admission.py`` checks that every trained token is within the bound and training never stalls,
whatever order groups finish in, and that training all of a group's tokens would break the bound.)

The bound needs no count of the batches the learner has taken: it cancels (``ahead = live - taken * g`` and
``lag = taken - V`` in the earlier formulation of the same rule). ``max_staleness: 0`` is synchronous on-policy
training. Drops only move groups forward, so a drop the driver has not learnt of yet makes it admit less, never
more.

**Which weights a request samples with** (:func:`plan_request`). The rule above holds for a request sampled at any
version ``V`` it is evaluated at, not only the latest. So a generator need not load every publication: a request
may sample with the version the generator already holds, ``h``, whenever the bound admits it at ``h`` (its budget
computed with ``V = h``), and loads the latest weights only when it does not. ``max_staleness: 0`` admits nothing at
an older version, so synchronous training loads every version, as before; asynchronous training skips loads while
generation is the slow stage, which is when a load on the engine's critical path costs the most.
"""

from __future__ import annotations

from collections.abc import Callable

from rlfleet.replay.buffer import DROPS

REPLAY_DROPS = tuple(f"replay/{name}" for name in DROPS)


def admission_budget(version: int, oldest_in_flight: int | None, live_groups: int, groups_per_step: int,
                     max_staleness: int) -> int:
    """Groups that may be requested now, sampled at ``version`` (>= 0; 0 means none).

    ``oldest_in_flight``: the lowest policy version among requests still being generated that the new one could
    overtake, i.e. on other generators (None when none is);
    ``live_groups``: groups requested so far and not known to be dropped or lost (trained ones included).
    """
    base = version if oldest_in_flight is None else min(version, oldest_in_flight)
    return max(0, (base + 1 + max_staleness) * groups_per_step - live_groups)


def plan_request(held: int, latest: int, prompts: int, budget_at: Callable[[int], int]) -> tuple[int, int]:
    """``(version, groups)`` of the next request on a generator that holds weights ``held`` (-1: none yet) when
    ``latest`` is published, at most ``prompts`` groups; ``budget_at(version)`` is :func:`admission_budget` with the
    generation sampled at ``version``.

    The held weights, with no load, when the bound admits a full request sampled with them; else the latest weights
    (loaded first) and what the bound admits with them (0: no request now). A partial request is never made with old
    weights: where the bound is that tight, fresh weights are worth their load.
    """
    if 0 <= held < latest and budget_at(held) >= prompts:
        return held, prompts
    return latest, max(0, min(prompts, budget_at(latest)))


class LiveGroups:
    """Admission's count of live groups (see above), kept from the events that change it: no counter is fetched.

    It starts from the groups live when the job (re)starts: those trained (one batch of ``groups_per_step`` per
    published version) and those queued in the replay actor, whose snapshot ``replay`` is. Then each request adds
    its groups (:meth:`requested`); groups a generator dropped or lost with its generator leave (:meth:`gone`); and
    every snapshot of the replay actor's stats (``replay/*``) that reaches the driver (:meth:`heard`: a generator's
    ack of its groups, within its results; the learner's pull) takes out the groups the replay actor dropped since the last one. Snapshots may be
    heard out of order: each carries the replay actor's event number ``replay/seq``, and only a newer one counts
    (its counters include every older one's). A drop not heard of yet leaves the count above the truth, so
    admission admits less, never more."""

    def __init__(self, trained: int = 0, replay: dict[str, float] | None = None):
        self.count = trained + int((replay or {}).get("replay/fresh_size", 0))
        self.latest = replay or {}  # the newest snapshot heard: the replay actor as the step records show it
        self._drops = replay_drops(replay) if replay else 0

    def requested(self, groups: int) -> None:
        self.count += groups

    def gone(self, groups: int) -> None:
        self.count -= groups

    def heard(self, replay: dict[str, float]) -> None:
        if replay.get("replay/seq", -1) <= self.latest.get("replay/seq", -1):
            return  # older than one already heard: its drops are in that one's counters
        drops = replay_drops(replay)
        self.count -= drops - self._drops
        self.latest, self._drops = {k: v for k, v in replay.items() if k.startswith("replay/")}, drops


def replay_drops(replay: dict[str, float]) -> int:
    """Groups the replay actor dropped (stale, zero-variance, overflow) so far, from a snapshot of its stats."""
    return int(sum(replay[k] for k in REPLAY_DROPS))
