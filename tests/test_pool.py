"""The generator pool's request queue, without Ray: requests pipelined on each generator, and the weights each
samples with (lazy loads), against fake actor handles that record the calls queued on them."""

from __future__ import annotations

import itertools

from rlfleet.cluster.admission import admission_budget
from rlfleet.cluster.pool import ACTIVE, GeneratorPool, Member, Request
from rlfleet.transport import WeightHandle

REFS = itertools.count()


class FakeMethod:
    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def remote(self, *args):
        ref = f"{self.name}-{next(REFS)}"
        self.calls.append((self.name, args, ref))
        return ref

    def options(self, **_):
        return self


class FakeActor:
    """Records ``generate`` / ``fetch_weights`` / ``update_weights`` / ``evaluate`` calls in the order they are
    queued."""

    def __init__(self):
        self.calls: list = []
        for name in ("generate", "stream", "fetch_weights", "update_weights", "evaluate"):
            setattr(self, name, FakeMethod(self.calls, name))


def pool_with(members: int, depth: int, prompts_per_request: int = 4) -> GeneratorPool:
    pool = GeneratorPool(lambda index, options: None, {"CPU": 1}, members, prompts_per_request, 10.0, depth)
    for i in range(members):
        m = Member(i, placement=None, state=ACTIVE, handle=FakeActor())
        pool.members.append(m)
    return pool


def budget(live: int, g: int = 4, s: int = 1):
    return lambda version, oldest, launched: admission_budget(version, oldest, live + launched, g, s)


def prompts(n: int) -> list[dict]:
    return [{"prompt_id": str(next(REFS))} for _ in range(n)]


def weights(version: int, transport: str = "object_store") -> WeightHandle:
    return WeightHandle(transport, version, payload=None)


def test_two_requests_queue_on_one_generator_and_the_load_only_before_the_first():
    """g = 4, S = 1, version 0, nothing live: (0 + 2) * 4 = 8 groups admitted, two requests of 4 on the one
    generator (depth 2); the weights are loaded once, before the first."""
    pool = pool_with(1, depth=2)
    assert pool.dispatch(weights(0), budget(0), prompts) == 8
    m = pool.members[0]
    assert [name for name, _, _ in m.handle.calls] == ["update_weights", "generate", "generate"]
    assert [q.version for q in m.requests] == [0, 0] and m.requests[0].sync_future is not None
    assert m.requests[1].sync_future is None and pool.oldest_in_flight() == 0
    assert pool.dispatch(weights(0), budget(8), prompts) == 0  # both slots taken


def test_depth_one_is_one_request_per_generator_and_the_emptiest_goes_first():
    pool = pool_with(2, depth=1)
    assert pool.dispatch(weights(0), budget(0), prompts) == 8
    assert [len(m.requests) for m in pool.members] == [1, 1]
    pool = pool_with(2, depth=2)
    assert pool.dispatch(weights(0), budget(0), prompts) == 8  # the bound admits 8: one request on each
    assert [len(m.requests) for m in pool.members] == [1, 1]


def test_a_generator_keeps_its_weights_while_the_bound_admits_them():
    """Version 3 published, the generator holds 2, 12 groups live: at version 2 the bound admits (2 + 2) * 4 - 12 =
    4, a full request: it samples with version 2 and nothing is loaded. The next request (16 live) is not admitted
    at version 2 ((2 + 2) * 4 - 16 = 0) but is at version 3, loaded first: (3 + 2) * 4 - 16 = 4. The first request,
    in flight with version 2, does not hold it back: it is ahead of it on the same generator. The load queued behind
    that request has its bytes fetched at once, beside the generation. With 8 live instead, the second request is
    admitted at version 2 as well."""
    pool = pool_with(1, depth=2)
    m = pool.members[0]
    m.version = 2
    assert pool.dispatch(weights(3), budget(12), prompts) == 8
    assert [name for name, _, _ in m.handle.calls] == ["generate", "fetch_weights", "update_weights", "generate"]
    assert [q.version for q in m.requests] == [2, 3] and m.requests[1].sync_future is not None
    assert pool.counts["sync/loads"] == 1 and pool.counts["sync/skipped_versions"] == 0
    pool = pool_with(1, depth=2)
    pool.members[0].version = 2
    assert pool.dispatch(weights(3), budget(4), prompts) == 8
    assert [q.version for q in pool.members[0].requests] == [2, 2]


def test_a_load_when_the_bound_requires_it_counts_the_versions_skipped():
    """The generator holds version 1 when 4 is published, 12 groups live: at version 1, (1 + 2) * 4 - 12 = 0: the
    latest are loaded (versions 2 and 3 were never loaded: skipped), and (4 + 2) * 4 - 12 = 12 admits 4 + 4 more."""
    pool = pool_with(1, depth=2)
    m = pool.members[0]
    m.version = 1
    assert pool.dispatch(weights(4), budget(12), prompts) == 8
    assert [name for name, _, _ in m.handle.calls] == ["update_weights", "generate", "generate"]
    assert [q.version for q in m.requests] == [4, 4]
    assert pool.counts["sync/loads"] == 1 and pool.counts["sync/skipped_versions"] == 2


def test_synchronous_training_and_broadcast_always_load_the_latest():
    pool = pool_with(1, depth=2)
    pool.members[0].version = 2
    assert pool.dispatch(weights(3), lambda v, o, n: admission_budget(v, o, 12 + n, 4, 0), prompts) == 4
    assert pool.members[0].requests[0].version == 3  # max_staleness 0: (2 + 1) * 4 - 12 = 0 at version 2
    pool = pool_with(1, depth=2)
    pool.members[0].version = 2
    assert pool.dispatch(weights(3, "broadcast"), budget(12), prompts) == 4 + 4
    assert [q.version for q in pool.members[0].requests] == [3, 3]  # a broadcast round cannot be served lazily


def test_a_slow_request_holds_back_the_other_generators_only():
    """Two generators, g = 4, S = 1. Generator 0 is generating with version 2 when version 3 is published, 16 groups
    live. A request on generator 1 could overtake it, so its bound is taken at version 2: (2 + 2) * 4 - 16 = 0. One
    queued behind it on generator 0 cannot overtake it: (3 + 2) * 4 - 16 = 4, at version 3. So the one request goes to
    generator 0, though generator 1 is the emptier."""
    pool = pool_with(2, depth=2)
    first, second = pool.members
    first.version = second.version = 2
    first.requests.append(Request("generate-slow", prompts(4), 2))
    pool.requests = first.last_request = 1  # generator 1 is also the least recently served
    assert pool.oldest_in_flight() == 2 and pool.oldest_in_flight(first) is None
    assert pool.oldest_in_flight(second) == 2
    assert pool.dispatch(weights(3), budget(16), prompts) == 4
    assert [q.version for q in first.requests] == [2, 3] and not second.requests
    assert [name for name, _, _ in first.handle.calls] == ["fetch_weights", "update_weights", "generate"]


def test_in_request_order_a_slow_request_holds_back_no_generator_and_lost_requests_are_skipped():
    """The case above with ``replay.consume_order: request``: nothing overtakes the slow request (its groups are
    trained first whatever finishes first), so generator 1's request is admitted at version 3: (3 + 2) * 4 - 16 = 4,
    and it goes to the emptier generator. Requests are numbered in the order made; when generator 1 dies, its
    request's number is skipped (the replay actor stops waiting for it) and its prompts are re-issued."""
    skipped: list[list[int]] = []
    pool = GeneratorPool(lambda index, options: None, {"CPU": 1}, 2, 4, 10.0, 2, skip_requests=skipped.append)
    for i in range(2):
        pool.members.append(Member(i, placement=None, state=ACTIVE, handle=FakeActor()))
    first, second = pool.members
    first.version = second.version = 2
    first.requests.append(Request("generate-slow", prompts(4), 2, seq=0))
    pool.next_seq = pool.requests = first.last_request = 1
    assert pool.oldest_in_flight(second) is None
    assert pool.dispatch(weights(3), budget(16), prompts) == 4
    assert [q.version for q in second.requests] == [3] and len(first.requests) == 1
    assert [q.seq for q in second.requests] == [1] and pool.next_seq == 2
    assert [args for name, args, _ in second.handle.calls if name == "generate"][0][1] == 1  # generate(records, seq)
    pool._lose_requests(second)
    assert skipped == [[1]] and len(pool.retry) == 4 and pool.lost() == 4


def test_in_arrival_order_requests_carry_no_number():
    pool = pool_with(1, depth=2)
    pool.dispatch(weights(0), budget(0), prompts)
    assert [q.seq for q in pool.members[0].requests] == [None, None]
    assert [args[1] for name, args, _ in pool.members[0].handle.calls if name == "generate"] == [None, None]


def stream_pool(depth: int, fenced: dict[str, list[str]] | None = None) -> tuple[GeneratorPool, list]:
    """One member with a continuous engine (its requests in the ``stream`` concurrency group, ``depth`` groups in
    flight at most); the replay actor's fence answers ``fenced``, and the calls to fence and forget are recorded."""
    asked: list = []

    def fence(keys):
        asked.append(("fence", keys))
        return {key: (fenced or {}).get(key, []) for key in keys}

    pool = GeneratorPool(lambda index, options: None, {"CPU": 1}, 1, depth, 10.0, depth, stream="stream",
                         fence_requests=fence, forget_requests=lambda keys: asked.append(("forget", keys)))
    pool.members.append(Member(0, placement=None, state=ACTIVE, handle=FakeActor()))
    return pool, asked


def test_a_continuous_engine_takes_what_the_bound_admits_in_one_request_up_to_its_room():
    """g = 4, S = 1, version 0, nothing live: the bound admits (0 + 2) * 4 = 8 groups. A continuous member with
    room for 6 groups gets one stream() request of 6 (not six requests of one), under a key of its own; it is then
    full, so nothing more goes out whatever the bound admits."""
    pool, _ = stream_pool(depth=6)
    assert pool.dispatch(weights(0), budget(0), prompts) == 6
    m = pool.members[0]
    (request,) = m.requests
    assert len(request.records) == 6 and request.key == "rlfleet-generator-0@0#1"
    calls = [(name, args) for name, args, _ in m.handle.calls if name in ("generate", "stream")]
    # stream(records, version, key, ordinal, lowest ordinal not heard ended, follows)
    assert calls == [("stream", (request.records, 0, request.key, 0, 0, False))]
    assert pool.generating() == 6 and pool.live.count == 6
    assert pool.dispatch(weights(0), budget(6, s=4), prompts) == 0  # the bound admits more; the member is full


def test_a_lost_streaming_request_reissues_only_what_the_replay_actor_lacks():
    """A member dies with a request of prompts p0..p3 (p1 twice) in flight, of which the replay actor holds the
    groups of p0 and one p1: the pool fences the request and re-issues p1 (the other one), p2 and p3; only those
    three count as lost and leave the live count (the two delivered are live: queued or trained). A request whose
    result arrived is forgotten."""
    records = [{"prompt_id": p} for p in ("p0", "p1", "p1", "p2", "p3")]
    pool, asked = stream_pool(depth=8, fenced={"rlfleet-generator-0@0#7": ["p1", "p0"]})
    m = pool.members[0]
    m.requests.append(Request("stream-lost", records, 0, key="rlfleet-generator-0@0#7"))
    pool.live.requested(5)
    pool._lose_requests(m)
    assert asked == [("fence", ["rlfleet-generator-0@0#7"])]
    assert [r["prompt_id"] for r in pool.retry] == ["p1", "p2", "p3"]
    assert pool.lost() == 3 and pool.live.count == 2 and m.requests == []


def test_groups_heard_as_made_leave_their_request_and_free_the_engine_room_at_once():
    """A continuous member with room for 6 takes one request of p0..p5. The stream's first handing-on settles p0
    and p2 (one group made, one dropped by the generator): they leave the request, so the member generates 4 and a
    new request of 2 goes out at once, while the first still runs. The drop leaves the live count (8 requested, 1
    dropped). Then the member dies: the replay actor holds p0 (heard) and p4 (not yet heard), so p1, p3 and p5 of
    the first request and both prompts of the second are re-issued; p0 and p4 stay live."""
    pool, asked = stream_pool(depth=6, fenced={"rlfleet-generator-0@0#1": ["p0", "p4"]})
    m = pool.members[0]
    names = iter(["p0", "p1", "p2", "p3", "p4", "p5", "q0", "q1"])
    take = lambda n: [{"prompt_id": next(names)} for _ in range(n)]  # noqa: E731
    assert pool.dispatch(weights(0), budget(0, s=4), take) == 6
    first = m.requests[0]
    pool.handed_on(m, first, ["p0", "p2"], {"gen/groups": 1, "gen/dropped_groups": 1, "policy_version": 0})
    assert [r["prompt_id"] for r in first.records] == ["p1", "p3", "p4", "p5"]
    assert pool.generating() == 4 and pool.live.count == 5
    assert pool.dispatch(weights(0), budget(5, s=4), take) == 2  # the room the two left, filled at once
    assert [len(q.records) for q in m.requests] == [4, 2] and pool.live.count == 7
    pool._lose_requests(m)
    assert [r["prompt_id"] for r in pool.retry] == ["p1", "p3", "p5", "q0", "q1"]
    assert pool.lost() == 5 and pool.live.count == 2


def test_a_prompt_twice_in_a_request_is_reissued_once_when_one_of_its_groups_was_heard():
    """p1 twice in a request: one of its groups was heard, the other not yet handed on. The replay actor's fence
    lists p1 once (the heard one): nothing of p1 arrived beyond what was heard, so the other p1 is re-issued."""
    records = [{"prompt_id": p} for p in ("p0", "p1", "p1")]
    pool, _ = stream_pool(depth=8, fenced={"k": ["p1"]})
    m = pool.members[0]
    request = Request("stream-lost", records, 0, key="k")
    m.requests.append(request)
    pool.live.requested(3)
    pool.handed_on(m, request, ["p1"], {"gen/groups": 1})
    pool._lose_requests(m)
    assert [r["prompt_id"] for r in pool.retry] == ["p0", "p1"] and pool.live.count == 1


def test_at_staleness_one_a_continuous_member_queues_a_request_that_follows_its_own():
    """g = 4, S = 1, room for 8. Version 0: one request of 8 (ordinal 0). The first 4 groups are heard (the
    learner's first batch) and version 1 is published: counting the member's own request (version 0, 4 groups still
    generating) the bound admits (min(1, 0) + 2) * 4 - 8 = 0; a request that follows it, with it left out, gets
    (1 + 2) * 4 - 8 = 4, at version 1, its load queued in flight before it (without ``follow``, nothing goes out).
    Once the first request's end is heard,
    the next request names ordinal 1 as the lowest not heard ended; a request with nothing of its member's
    generating starts at once (follows nothing)."""
    pool, _ = stream_pool(depth=8)
    m = pool.members[0]
    names = (f"p{i}" for i in itertools.count())
    take = lambda n: [{"prompt_id": next(names)} for _ in range(n)]  # noqa: E731
    assert pool.dispatch(weights(0), budget(0, s=1), take) == 8
    first = m.requests[0]
    pool.handed_on(m, first, ["p0", "p1", "p2", "p3"], {"gen/groups": 4, "policy_version": 0})
    assert pool.oldest_in_flight(m) == 0 and pool.oldest_in_flight(m, follows=True) is None
    assert pool.dispatch(weights(1), budget(8, s=1), take) == 0  # the pool was made without follow
    pool.follow = True
    assert pool.dispatch(weights(1), budget(8, s=1), take) == 4
    second = m.requests[1]
    assert (second.version, second.ordinal, second.follows) == (1, 1, True)
    calls = [(name, args) for name, args, _ in m.handle.calls]
    assert [name for name, _ in calls] == ["update_weights", "stream", "fetch_weights", "update_weights", "stream"]
    assert calls[-1] == ("stream", (second.records, 1, second.key, 1, 0, True))
    assert pool.counts["gen/following_requests"] == 1
    pool.dispatch(weights(1), budget(12, s=1), take)  # nothing more: (1 + 2) * 4 - 12 = 0 either way
    assert len(m.requests) == 2

    pool.handed_on(m, first, ["p4", "p5", "p6", "p7"], {"gen/groups": 4, "policy_version": 1})
    pool._done(m, first)  # its stream ended
    pool.handed_on(m, second, [r["prompt_id"] for r in second.records], {"gen/groups": 4, "policy_version": 1})
    assert pool.dispatch(weights(2), budget(12, s=1), take) == 4  # nothing generating: (2 + 2) * 4 - 12
    third = m.requests[-1]
    assert (third.ordinal, third.follows) == (2, False)
    assert m.handle.calls[-1][1][3:] == (2, 1, False)  # ordinal 1's end not heard yet
