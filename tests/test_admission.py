"""Admission control (rlfleet.cluster.admission): the staleness bound over random event orders, without Ray.

A small simulator plays the driver, several generators of random speed, the replay FIFO and the learner, in an
order drawn at random at every event: requests are sized by the admission function, deliveries happen in any order
(and groups may be dropped), the learner takes the next ``g`` groups whenever the FIFO has them and finishes steps
at random moments. Every trained group's staleness (the learner's version when it trains it minus the version that
sampled it) must stay within the bound, with no staleness filter in the replay to hide a violation, and training
must never stall while generators are free.
"""

from __future__ import annotations

import random

import pytest

from rlfleet.cluster.admission import LiveGroups, admission_budget, plan_request
from rlfleet.replay.order import RequestOrder


def naive_budget(version, oldest_in_flight, live_groups, groups_per_step, max_staleness):
    """The same rule with the current version only (no oldest-in-flight): what the simulator must catch."""
    return admission_budget(version, None, live_groups, groups_per_step, max_staleness)


def simulate(seed: int, budget_fn=admission_budget, steps: int = 40) -> list[int]:
    """One random run with one request per generator, always on the latest weights; returns the staleness of every
    trained group. Raises on a stall."""
    return simulate_pipelined(seed, lazy=False, steps=steps, budget_fn=budget_fn, depth=1)[0]


@pytest.mark.parametrize("seed", range(300))
def test_random_event_orders_keep_the_bound(seed):
    rng = random.Random(seed)
    rng.randint(1, 4)
    max_staleness = rng.randint(0, 3)
    staleness = simulate(seed)
    assert staleness and max(staleness) <= max_staleness


def test_the_simulator_catches_the_rule_without_the_oldest_request():
    """With the current version alone, a fast request made later fills the slots a slow, older one counted on:
    some orders break the bound. (If this stopped failing, the property test above would prove nothing.)"""
    violations = 0
    for seed in range(300):
        rng = random.Random(seed)
        rng.randint(1, 4)
        max_staleness = rng.randint(0, 3)
        violations += max(simulate(seed, naive_budget)) > max_staleness
    assert violations > 0


def test_worked_example():
    """g = 4, S = 1, version 2, nothing in flight: (2 + 1 + 1) * 4 = 16 groups may ever be live; 13 are, so 3 more.
    A request still generating with version-1 weights lowers the ceiling to (1 + 1 + 1) * 4 = 12: none."""
    assert admission_budget(2, None, 13, 4, 1) == 3
    assert admission_budget(2, 1, 13, 4, 1) == 0
    assert admission_budget(0, None, 0, 4, 0) == 4  # synchronous: one batch per version


# ---------------------------------------------------------------------------------- pipelining and lazy loads


def broken_plan(held, latest, prompts, budget_at):
    """Keeps old weights whenever a generator has any, sized by the budget at the latest version: what the
    simulator must catch."""
    version, n = plan_request(-1, latest, prompts, budget_at)
    return (held if held >= 0 else version), n


def simulate_pipelined(seed: int, plan=plan_request, lazy: bool = True, steps: int = 40, budget_fn=admission_budget,
                       depth: int | None = None, in_order: bool = True, request_order: bool = False,
                       generators: int | None = None, max_staleness: int | None = None, order_cls=RequestOrder,
                       own_queue: bool = False, spans: list[int] | None = None, token_unit: bool = False,
                       mask_tokens: bool = True, follow: bool = False, followers_in_order: bool = True):
    """One random run: the driver, ``depth`` requests at most queued on each generator (drawn at random when None),
    delivered in the order queued (with ``in_order``; else any queued request may finish first), each request's
    weights chosen by ``plan`` from the version the generator holds (with ``lazy``; else always the latest) and sized
    by ``budget_fn`` with the oldest version in flight on the other generators, the replay FIFO and the learner, in
    an order drawn at random at every event. With ``request_order`` (``replay.consume_order: request``) the
    deliveries pass through :class:`~rlfleet.replay.order.RequestOrder` on their way to the FIFO, the budget counts
    no request in flight (nothing overtakes), and a delivery may instead be a request lost with its generator
    (skipped). With ``own_queue`` the oldest version in flight counts the generator's own queue too (continuous
    engines, whose requests finish in any order); ``spans`` collects, per delivered request, the versions published
    while it was in flight (with in-flight weight updates its last tokens carry the version current at delivery, its
    first the one it was admitted at). With ``token_unit`` (``replay.staleness_unit: token``) the budget counts no
    request in flight, neither as the oldest version nor among the live groups (``depth`` caps them), over a window
    of two batches at most (``min(S, 1)``), the replay FIFO drops a group whose newest token is past the bound when the learner takes
    its batch, and the learner trains only the tokens within it (all of them without ``mask_tokens``): the
    staleness returned is then the oldest *trained* token's. With ``follow`` (and ``own_queue``), where the bound
    admits nothing on a generator with a request queued, a request that *follows* its queue is admitted with the
    generator's own queue left out, and is delivered only once every request queued before it on the generator has
    been (with ``followers_in_order``; else in any order, which the simulator must catch). Returns (staleness of
    every trained group, [(sample version, latest version, max_staleness, follows)] of every request, loads, the
    mean number of generators with a request in flight before each event). Raises on a stall."""
    rng = random.Random(seed)
    g, s = rng.randint(1, 4), rng.randint(0, 3)
    s = s if max_staleness is None else max_staleness
    generators = generators or (rng.randint(1, 4) if depth == 1 else rng.randint(1, 3))
    depth = depth or rng.randint(1, 3)
    per_request = min(rng.randint(1, 3 * g), (s + 1) * g)
    drop_p = rng.choice([0.0, 0.0, 0.1, 0.3])
    lose_p = rng.choice([0.0, 0.1]) if request_order else 0.0
    order = order_cls()
    version = seq = 0
    fifo: list[tuple[int, int]] = []  # (the group's oldest token's version, its newest's)
    busy: list[int] = []
    # (version, groups, seq, follows its generator's earlier requests)
    queues: dict[int, list[tuple[int, int, int, bool]]] = {gen: [] for gen in range(generators)}
    held = dict.fromkeys(range(generators), -1)  # what each generator holds once its queued loads ran
    taken: list[int] | None = None
    live = dropped_known = loads = 0
    staleness: list[int] = []
    requests: list[tuple[int, int, int]] = []
    while version < steps:
        while True:  # the driver fills free slots, on the emptiest generator the bound admits a request on
            free = [gen for gen in range(generators) if len(queues[gen]) < depth]
            for gen in sorted(free, key=lambda x: len(queues[x])):
                for follows in (False, True) if follow and queues[gen] else (False,):
                    oldest = None if request_order or token_unit else min(
                        (v for other, q in queues.items() if (own_queue and not follows) or other != gen
                         for v, _, _, _ in q), default=None)
                    # the token unit's window counts the settled groups only; a generator's depth caps the rest
                    counted = live - dropped_known - (sum(n for q in queues.values() for _, n, _, _ in q)
                                                      if token_unit else 0)
                    window = min(s, 1) if token_unit else s  # the token unit's window: two batches settled at most
                    v, n = plan(held[gen] if lazy else -1, version, per_request,
                                lambda at: budget_fn(at, oldest, counted, g, window))
                    if n > 0:
                        break
                if n > 0:
                    break
            else:
                break
            if v != held[gen]:
                assert v == version  # a load is always of the latest weights
                held[gen], loads = v, loads + 1
            queues[gen].append((v, n, seq, follows))

            requests.append((v, version, s, follows))
            live, seq = live + n, seq + 1
        busy.append(sum(bool(q) for q in queues.values()))
        events = [("deliver", gen) for gen in queues if queues[gen]]
        if taken is None and len(fifo) >= g:
            events.append(("take", None))
        if taken is not None:
            events.append(("finish", None))
        if not events:
            raise AssertionError(f"seed {seed}: stalled at version {version} with {len(fifo)} queued, g={g}, s={s}")
        kind, gen = rng.choice(events)
        if kind == "deliver":
            ready = [i for i, (_, _, _, follows) in enumerate(queues[gen])
                     if in_order and i == 0 or not in_order and (i == 0 or not follows or not followers_in_order)]
            v, n, number, _ = queues[gen].pop(rng.choice(ready))
            if spans is not None:
                spans.append(version - v)
            if rng.random() < lose_p:  # lost with its generator: the driver knows, the replay actor skips it
                dropped_known += n
                fifo.extend(order.skip(number))
                continue
            kept = sum(rng.random() >= drop_p for _ in range(n))
            dropped_known += n - kept
            delivered = [(v, version)] * kept  # continuous engines: the last token sampled with the latest weights
            fifo.extend(order.deliver(number, delivered) if request_order else delivered)
        elif kind == "take":
            if token_unit:  # the replay actor drops what has no token left within the bound
                fresh = [(first, last) for first, last in fifo if version - last <= s]
                dropped_known, fifo = dropped_known + len(fifo) - len(fresh), fresh
            if len(fifo) >= g:
                taken, fifo = fifo[:g], fifo[g:]
        else:
            fresh_from = version - s if token_unit and mask_tokens else -1  # the learner's token mask
            staleness += [version - max(first, fresh_from) for first, _ in taken]
            taken, version = None, version + 1
    return staleness, requests, loads, sum(busy) / len(busy)


@pytest.mark.parametrize("seed", range(300))
def test_pipelined_lazy_requests_keep_the_bound(seed):
    staleness, requests, _, _ = simulate_pipelined(seed)
    max_staleness = requests[0][2]
    assert staleness and max(staleness) <= max_staleness
    if max_staleness == 0:  # synchronous: every request samples with the latest weights
        assert all(v == latest for v, latest, *_ in requests)


def test_lazy_loading_skips_loads_and_the_simulator_catches_a_rule_that_ignores_the_bound():
    """Over 300 random runs the lazy rule loads less than loading on every request would (versions are skipped), and
    keeping old weights regardless of the bound breaks it in some orders (so the property test can fail)."""
    lazy_loads = eager_loads = violations = 0
    for seed in range(300):
        lazy_loads += simulate_pipelined(seed)[2]
        eager_loads += simulate_pipelined(seed, lazy=False)[2]
        staleness, requests, _, _ = simulate_pipelined(seed, plan=broken_plan)
        violations += max(staleness) > requests[0][2]
    assert lazy_loads < eager_loads and violations > 0


def test_the_simulator_catches_requests_overtaking_on_one_generator():
    """The bound leaves a generator's own queue out of the oldest version in flight because its requests arrive in
    the order queued. If a later request could finish first, that would break the bound in some orders (so the
    property test above depends on the order, and can fail)."""
    violations = 0
    for seed in range(300):
        staleness, requests, _, _ = simulate_pipelined(seed, in_order=False)
        violations += max(staleness) > requests[0][2]
    assert violations > 0


@pytest.mark.parametrize("seed", range(300))
def test_continuous_engines_keep_the_bound_on_the_oldest_token(seed):
    """Continuous engines (``generation.engine: continuous``): a generator's requests finish in any order, every
    publication is loaded in flight (always the latest weights), and the budget counts the generator's own queue in
    the oldest version in flight. The oldest token of every trained group (sampled at the version its request was
    admitted at: later tokens are newer) is within the bound."""
    staleness, requests, _, _ = simulate_pipelined(seed, lazy=False, in_order=False, own_queue=True)
    assert staleness and max(staleness) <= requests[0][2]


def test_the_simulator_catches_continuous_engines_that_leave_their_own_queue_out():
    """The same runs with the batched engines' rule (the generator's own queue left out of the oldest in flight)
    break the bound in some orders, so the property test above can fail; and in-flight updates do happen in them
    (requests delivered after newer weights were published: tokens of more than one version)."""
    violations, spans = 0, []
    for seed in range(300):
        staleness, requests, _, _ = simulate_pipelined(seed, lazy=False, in_order=False, spans=spans)
        violations += max(staleness) > requests[0][2]
    assert violations > 0 and max(spans) >= 1


@pytest.mark.parametrize("seed", range(300))
def test_continuous_requests_that_follow_their_generators_queue_keep_the_bound(seed):
    """Continuous engines whose requests may *follow* (rlfleet.generation.own_order): where the bound counting the
    generator's own queue admits nothing, a request admitted with that queue left out, delivered only after every
    request queued before it on the generator; the others finish in any order. Every trained group's oldest token is
    within the bound, at every S, S = 1 included."""
    staleness, requests, _, _ = simulate_pipelined(seed, lazy=False, in_order=False, own_queue=True, follow=True,
                                                   max_staleness=1 if seed % 2 else None)
    assert staleness and max(staleness) <= requests[0][2]


def test_followers_need_their_order_and_do_their_work_at_staleness_one():
    """The same runs with followers delivered in any order break the bound in some (so the property test above can
    fail); and followers are made in them: at S = 1 every run with a generator holding a request at a publication
    makes some, and a generator then has a request queued at more of the events than without them."""
    violations = followers = 0
    busy_with = busy_without = 0.0
    for seed in range(300):
        staleness, requests, _, busy = simulate_pipelined(seed, lazy=False, in_order=False, own_queue=True,
                                                          follow=True, followers_in_order=False, max_staleness=1)
        violations += max(staleness) > requests[0][2]
        followers += sum(follows for *_, follows in requests)
        busy_with += simulate_pipelined(seed, lazy=False, in_order=False, own_queue=True, follow=True,
                                        max_staleness=1, generators=1)[3]
        busy_without += simulate_pipelined(seed, lazy=False, in_order=False, own_queue=True, max_staleness=1,
                                           generators=1)[3]
    assert violations > 0 and followers > 0 and busy_with > busy_without


@pytest.mark.parametrize("seed", range(300))
def test_the_token_unit_keeps_every_trained_token_within_the_bound(seed):
    """``replay.staleness_unit: token`` on continuous engines: requests finish in any order with every publication
    loaded in flight, the budget waits for no request in flight, the replay drops groups with no token left within
    the bound, and the learner masks the rest's older tokens: no trained token lags more than the bound, and
    training never stalls."""
    staleness, requests, _, _ = simulate_pipelined(seed, lazy=False, in_order=False, token_unit=True)
    assert staleness and max(staleness) <= requests[0][2]


def test_the_token_unit_needs_its_mask_and_keeps_generators_busier():
    """The same runs training every token of a group (no mask) break the bound in some orders, so the test above
    can fail; and at max_staleness 1 the token unit keeps generators in flight more than the group unit, whose
    budget waits for the oldest group still generating (the straggler)."""
    violations = 0
    for seed in range(300):
        staleness, requests, _, _ = simulate_pipelined(seed, lazy=False, in_order=False, token_unit=True,
                                                       mask_tokens=False)
        violations += max(staleness) > requests[0][2]
    assert violations > 0
    group = [simulate_pipelined(seed, lazy=False, in_order=False, own_queue=True, max_staleness=1, generators=2,
                                depth=3)[3] for seed in range(100)]
    token = [simulate_pipelined(seed, lazy=False, in_order=False, token_unit=True, max_staleness=1, generators=2,
                                depth=3)[3] for seed in range(100)]
    assert sum(token) > sum(group)


class ArrivalOrder:
    """Releases every delivery at once: request numbering without the reordering, what the simulator must catch."""

    def deliver(self, seq, items):
        return items

    def skip(self, seq):
        return []


@pytest.mark.parametrize("seed", range(300))
def test_request_order_keeps_the_bound_whatever_order_requests_finish_in(seed):
    """``replay.consume_order: request``: the budget counts no request in flight, any queued request on any
    generator may finish first, some are lost with their generator (skipped), and every trained group is within
    the bound."""
    staleness, requests, _, _ = simulate_pipelined(seed, in_order=False, request_order=True)
    assert staleness and max(staleness) <= requests[0][2]


def test_request_order_depends_on_the_reordering_and_lets_generators_work_side_by_side():
    """Without the reordering (numbers, but groups released as they arrive) the same runs break the bound in some
    orders, so the property test above can fail. With it, at max_staleness 1 two generators are in flight at once
    more often than in arrival order, whose budget waits for the oldest request in flight on another generator."""
    violations = 0
    for seed in range(300):
        staleness, requests, _, _ = simulate_pipelined(seed, in_order=False, request_order=True,
                                                       order_cls=ArrivalOrder)
        violations += max(staleness) > requests[0][2]
    assert violations > 0
    arrival = [simulate_pipelined(seed, generators=2, max_staleness=1, depth=2)[3] for seed in range(100)]
    request = [simulate_pipelined(seed, generators=2, max_staleness=1, depth=2, request_order=True)[3]
               for seed in range(100)]
    assert sum(request) > sum(arrival)


def test_plan_request_by_hand():
    """g = 4, S = 1, latest 3, 12 groups live, nothing in flight: at version 2 the bound admits (2 + 2) * 4 - 12 = 4,
    a full request of 4 with the held weights; at version 1 only 0, so the latest are loaded: (3 + 2) * 4 - 12 = 8,
    capped at 4. A generator with no weights yet always loads."""
    def budget_at(version):
        return admission_budget(version, None, 12, 4, 1)

    assert plan_request(2, 3, 4, budget_at) == (2, 4)
    assert plan_request(1, 3, 4, budget_at) == (3, 4)
    assert plan_request(-1, 3, 4, budget_at) == (3, 4)
    assert plan_request(2, 3, 6, budget_at) == (3, 6)  # 4 < 6 at version 2: no partial request with old weights
    assert plan_request(3, 3, 4, lambda v: 0) == (3, 0)


def snapshot(seq: int, stale: int = 0, zero_variance: int = 0, overflow: int = 0, fresh: int = 0) -> dict:
    return {"replay/seq": float(seq), "replay/dropped_stale": float(stale), "replay/fresh_size": float(fresh),
            "replay/dropped_zero_variance": float(zero_variance), "replay/dropped_overflow": float(overflow)}


def test_live_groups_by_hand():
    """Restarted at version 2 with g = 4: 8 groups trained, 3 queued, 1 dropped before (it does not count again).
    8 + 3 = 11; a request of 4: 15; a generator drops 1: 14; a snapshot (seq 5) with 2 stale drops and the earlier
    one: 3 - 1 = 2 new drops, 12; an older snapshot (seq 4, 2 drops) heard late changes nothing; a newer one with
    the same counters changes nothing but the figures the record shows."""
    live = LiveGroups(8, snapshot(1, overflow=1, fresh=3))
    assert live.count == 11
    live.requested(4)
    live.gone(1)
    assert live.count == 14
    live.heard(snapshot(5, stale=2, overflow=1, fresh=2))
    assert live.count == 12
    live.heard(snapshot(4, stale=1, overflow=1, fresh=6))
    assert live.count == 12 and live.latest["replay/seq"] == 5
    live.heard(snapshot(7, stale=2, overflow=1, fresh=0))
    assert live.count == 12 and live.latest["replay/fresh_size"] == 0


@pytest.mark.parametrize("seed", range(20))
def test_live_groups_heard_in_any_order_count_the_newest_drops_and_never_fewer_than_the_truth(seed):
    """The replay actor's drops grow over 30 events; their snapshots reach the driver in a random order and some
    never do. The count is always the start plus requests minus the drops of the newest snapshot heard (an
    independent recomputation), and never below the truth (every drop so far), so admission never admits more."""
    rng = random.Random(seed)
    drops, snapshots = 0, []
    for seq in range(1, 31):
        drops += rng.choice([0, 0, 1, 2])
        snapshots.append(snapshot(seq, stale=drops))
    heard = [s for s in snapshots if rng.random() < 0.7]
    rng.shuffle(heard)
    live = LiveGroups(0, snapshot(0))
    live.requested(100)
    newest = None
    for s in heard:
        live.heard(s)
        newest = s if newest is None or s["replay/seq"] > newest["replay/seq"] else newest
        assert live.count == 100 - newest["replay/dropped_stale"]
        assert live.count >= 100 - drops
    if heard:
        assert live.latest == newest


def test_live_groups_keep_only_the_replay_actors_figures_of_a_generators_results():
    """A generator's results carry the ack among its own figures (its policy_version, gen/*): the record takes only
    the replay actor's."""
    live = LiveGroups(0, snapshot(0))
    live.heard(snapshot(3, fresh=4) | {"policy_version": 0.0, "gen/groups": 4.0})
    assert set(live.latest) == set(snapshot(3))
