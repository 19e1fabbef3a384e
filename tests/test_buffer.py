"""The replay buffer (rlfleet/replay/buffer.py) and group serialization (rlfleet/types.py)."""

import dataclasses
import io
import json
import math

import numpy as np
import pytest

from rlfleet.config import ReplayConfig
from rlfleet.replay.buffer import ReplayBuffer
from rlfleet.types import Group, groups_from_arrays, groups_to_arrays


def _group(pid: str, score: float = 1.0, version: int = 0, n: int = 2, t: int = 3, prompt_len: int = 2) -> Group:
    """A group of score ``score`` (advantages [score, 0, ...], std 1 -> sum|A|*std = score); score 0 = zero variance."""
    advantages = np.zeros(n, np.float32)
    advantages[0] = score
    return Group(
        prompt_id=pid,
        prompt_token_ids=np.arange(prompt_len, dtype=np.int32),
        completion_ids=np.full((n, t), 7, np.int32),
        completion_lengths=np.full(n, t, np.int32),
        behaviour_logprobs=np.full((n, t), -0.5, np.float32),
        rewards=advantages.copy(),
        advantages=advantages,
        truncated=np.zeros(n, bool),
        policy_version=version,
        reward_std=1.0 if score else 0.0,
    )


def _buffer(**kw) -> ReplayBuffer:
    return ReplayBuffer(ReplayConfig(**({"max_staleness": 0} | kw)), seed=0)


def _ids(groups) -> list[str]:
    return [g.prompt_id for g in groups]


def _same(g: Group, h: Group) -> bool:
    """Field-by-field equality: same dtypes and values (NaN equals NaN), same scalars and meta."""
    arrays = ("prompt_token_ids", "completion_ids", "completion_lengths", "behaviour_logprobs", "rewards", "advantages")
    for name in arrays + ("truncated",):
        x, y = getattr(g, name), getattr(h, name)
        if x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            return False
    scalars = ("prompt_id", "policy_version", "reward_std", "meta")
    return all(getattr(g, name) == getattr(h, name) for name in scalars)


def test_reservoir_keeps_top_scores_case_7_10():
    """7.10, max_size=3: offering scores 0.5, 0.2, 0.9, 0.4 keeps {0.9, 0.5, 0.4} (0.2 is the min when 0.4 arrives and
    is evicted); then 0.3 < min 0.4 is rejected. A batch offers its variance groups when it consumes them."""
    buf = _buffer(replay_buffer_size=3, zero_variance="replay")
    groups = [_group(f"s{s}", s) for s in (0.5, 0.2, 0.9, 0.4)]
    buf.add(groups)
    assert all(a is b for a, b in zip(buf.sample(4, 0), groups))
    assert [g.score for g in buf.reservoir] == pytest.approx([0.9, 0.5, 0.4])
    buf.add([_group("s0.3", 0.3)])
    assert _ids(buf.sample(1, 0)) == ["s0.3"]
    assert _ids(buf.reservoir) == ["s0.9", "s0.5", "s0.4"]
    assert buf.stats()["replay/reservoir_score_mean"] == pytest.approx(1.8 / 3)


def test_draw_probabilities_are_proportional_to_score():
    """7.10: p = [0.9, 0.5, 0.4] / 1.8 = [0.5, 0.2778, 0.2222]. n=5 > 3 groups draws with replacement (i.i.d.), so
    6000 batches of 5 zero-variance groups give N = 30000 draws; each frequency is within 4 binomial stds
    sqrt(p(1-p)/N) <= 0.0029 of p (uniform draws, 1/3 each, would miss by >= 0.056)."""
    buf = _buffer(replay_buffer_size=3, zero_variance="replay")
    buf.add([_group(f"s{s}", s) for s in (0.9, 0.5, 0.4)])
    buf.sample(3, 0)
    zero = _group("zero", 0.0)
    counts = dict.fromkeys(["s0.9", "s0.5", "s0.4"], 0)
    for _ in range(6000):
        buf.add([zero] * 5)
        for g in buf.sample(5, 0):
            counts[g.prompt_id] += 1
    n = 30000
    for pid, p in (("s0.9", 0.5), ("s0.5", 0.5 / 1.8), ("s0.4", 0.4 / 1.8)):
        assert abs(counts[pid] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (pid, counts)
    assert buf.stats()["replay/substituted"] == n


def test_draws_are_without_replacement_when_the_reservoir_holds_enough():
    """k <= reservoir size: the k draws of one batch are distinct (TRL). With replacement, 3 draws from
    p = [0.5, 0.28, 0.22] would all differ with probability 6 * 0.5 * 0.2778 * 0.2222 = 0.185 per batch, so 200
    batches of distinct draws rule it out. k = 4 > 3 must repeat a group (pigeonhole) and must not raise."""
    buf = _buffer(replay_buffer_size=3, zero_variance="replay")
    buf.add([_group(f"s{s}", s) for s in (0.9, 0.5, 0.4)])
    buf.sample(3, 0)
    zero = _group("zero", 0.0)
    for _ in range(200):
        buf.add([zero] * 3)
        assert sorted(_ids(buf.sample(3, 0))) == ["s0.4", "s0.5", "s0.9"]
    buf.add([zero] * 4)
    assert len(set(_ids(buf.sample(4, 0)))) <= 3


def test_group_score_of_case_7_10():
    """7.10: r = [0,1,0,1], mean 0.5, unbiased std = sqrt(4 * 0.25 / 3) = 0.577350, A = +-0.5 / (0.577350 + 1e-4)
    = +-0.865875, score = 4 * 0.865875 * 0.577350 = 1.999654; the reservoir records that score."""
    r = np.array([0, 1, 0, 1], np.float32)
    std = float(np.std(r, ddof=1))
    g = _group("g", n=4)
    g.rewards, g.advantages, g.reward_std = r, ((r - r.mean()) / (std + 1e-4)).astype(np.float32), std
    assert g.score == pytest.approx(1.999654, abs=1e-5)
    buf = _buffer(replay_buffer_size=3)
    buf.add([g])
    buf.sample(1, 0)
    assert buf.stats()["replay/reservoir_score_mean"] == pytest.approx(1.999654, abs=1e-5)


def test_equal_scores_do_not_crash_and_keep_the_earliest():
    """Capacity 2, five groups of score 1: ties never compare Groups; later ties are not strictly larger than the min,
    so g0, g1 stay. A score-2 group then evicts the min (1, tie-breaker 0), i.e. g0. Draws over ties work."""
    buf = _buffer(replay_buffer_size=2, zero_variance="replay")
    buf.add([_group(f"g{i}", 1.0) for i in range(5)])
    buf.sample(5, 0)
    assert _ids(buf.reservoir) == ["g0", "g1"]
    buf.add([_group("g5", 2.0)])
    buf.sample(1, 0)
    assert _ids(buf.reservoir) == ["g5", "g1"]
    buf.add([_group("zero", 0.0)] * 2)
    assert sorted(_ids(buf.sample(2, 0))) == ["g1", "g5"]


def test_size_0_disables_the_reservoir():
    """replay_buffer_size=0 with "replay": nothing is buffered and a zero-variance group cannot be replaced, so it is
    dropped and counted; the batch is filled from the next fresh group."""
    buf = _buffer(replay_buffer_size=0, zero_variance="replay")
    buf.add([_group("a"), _group("zero", 0.0), _group("b")])
    assert _ids(buf.sample(2, 0)) == ["a", "b"]
    s = buf.stats()
    assert (s["replay/reservoir_size"], s["replay/dropped_zero_variance"], s["replay/substituted"]) == (0, 1, 0)


def test_empty_reservoir_drops_zero_variance_groups():
    """Empty reservoir and a batch with no variance group: nothing can be drawn, both zero-variance groups are dropped
    (counted), the queue runs dry and sample returns None."""
    buf = _buffer(replay_buffer_size=3, zero_variance="replay")
    buf.add([_group("z1", 0.0), _group("z2", 0.0)])
    assert buf.sample(2, 0) is None
    s = buf.stats()
    assert (s["replay/dropped_zero_variance"], s["replay/fresh_size"], s["replay/sampled"]) == (2, 0, 0)


def test_batch_groups_are_buffered_before_draws():
    """TRL buffers the batch's variance groups before sampling: with an empty reservoir, batch [zero, a] replaces the
    zero group by a (the only reservoir group), though a comes later in the queue. The replayed group is the stored
    one, with its advantages and behaviour log-probs."""
    buf = _buffer(replay_buffer_size=3, zero_variance="replay")
    a = _group("a", 0.7)
    buf.add([_group("zero", 0.0), a])
    batch = buf.sample(2, 0)
    assert batch[0] is a and batch[1] is a
    assert buf.stats()["replay/substituted"] == 1


@pytest.mark.parametrize(
    ("policy", "expected", "dropped"),
    [("keep", ["z1", "a", "z2"], 0), ("drop", ["a", "b", "c"], 2), ("replay", ["a", "a", "a"], 0)],
)
def test_zero_variance_policies(policy, expected, dropped):
    """Queue [z1, a, z2, b, c], n=3. keep: trains z1, a, z2 as they are. drop: skips z1, z2 (DAPO dynamic sampling).
    replay (reservoir of 3, initially empty): a is buffered and is the only group to draw, so z1 and z2 become a."""
    buf = _buffer(replay_buffer_size=3, zero_variance=policy)
    buf.add([_group("z1", 0.0), _group("a"), _group("z2", 0.0), _group("b"), _group("c")])
    assert _ids(buf.sample(3, 0)) == expected
    assert buf.stats()["replay/dropped_zero_variance"] == dropped


def test_staleness_bound_at_the_exact_boundary_and_replay_exemption():
    """max_staleness=1 at current version 5: version 4 (5-4 = 1) is kept, version 3 (5-3 = 2 > 1) is dropped.
    A reservoir group of version 0 is still drawn at version 100: replayed groups are exempt."""
    buf = ReplayBuffer(ReplayConfig(max_staleness=1, replay_buffer_size=2, zero_variance="replay"), seed=0)
    buf.add([_group("v3", version=3), _group("v4", version=4), _group("v5", version=5)])
    assert _ids(buf.sample(2, 5)) == ["v4", "v5"]
    assert buf.stats()["replay/dropped_stale"] == 1
    buf.add([_group("zero", 0.0, version=100)])
    assert _ids(buf.sample(1, 100)) in (["v4"], ["v5"])


def test_the_token_unit_drops_a_group_only_when_its_newest_token_is_past_the_bound():
    """replay.staleness_unit: token, max_staleness 1, at version 5: a group whose tokens span versions 2..4 is kept
    (its version-4 tokens train; the learner masks the rest), one spanning 1..3 is dropped (nothing of it is within
    the bound). The group unit drops both (their oldest tokens, 2 and 1, are past it)."""
    def spanning(pid, first, last):
        g = _group(pid, version=first, t=3)
        return dataclasses.replace(g, token_versions=np.array([[first, last, last]] * g.size, np.int32))

    for unit, kept in (("token", ["2..4", "5"]), ("group", ["5", "5b"])):
        buf = ReplayBuffer(ReplayConfig(max_staleness=1, staleness_unit=unit), seed=0)
        buf.add([spanning("1..3", 1, 3), spanning("2..4", 2, 4), _group("5", version=5), _group("5b", version=5)])
        assert _ids(buf.sample(2, 5)) == kept
        assert buf.stats()["replay/dropped_stale"] == (1 if unit == "token" else 2)


def test_short_batch_returns_none_and_loses_nothing():
    """n=3 with two usable groups queued behind a stale one: None, the stale drop stands, the two usable groups stay
    queued in order; one more group completes the batch. A replay placeholder waiting in a short batch also stays."""
    buf = ReplayBuffer(ReplayConfig(max_staleness=1, replay_buffer_size=2, zero_variance="replay"), seed=0)
    buf.add([_group("stale", version=0), _group("a", version=5), _group("b", version=5)])
    assert buf.sample(3, 5) is None
    s = buf.stats()
    assert (s["replay/fresh_size"], s["replay/dropped_stale"], s["replay/sampled"]) == (2, 1, 0)
    assert s["replay/reservoir_size"] == 0  # nothing was offered: the batch was not formed
    buf.add([_group("c", version=5)])
    assert _ids(buf.sample(3, 5)) == ["a", "b", "c"]
    buf.add([_group("zero", 0.0, version=5)])
    assert buf.sample(2, 5) is None and buf.stats()["replay/fresh_size"] == 1
    with pytest.raises(ValueError, match="n=0"):
        buf.sample(0, 5)


def test_fresh_overflow_drops_the_oldest():
    """max_fresh=3, five groups added: g0, g1 are dropped (counted), g2..g4 remain in order."""
    buf = _buffer(max_fresh=3)
    buf.add([_group(f"g{i}") for i in range(5)])
    s = buf.stats()
    assert (s["replay/added"], s["replay/dropped_overflow"], s["replay/fresh_size"]) == (5, 2, 3)
    assert _ids(buf.sample(3, 0)) == ["g2", "g3", "g4"]


def test_stats_keys():
    expected = {"fresh_size", "reservoir_size", "added", "sampled", "substituted", "dropped_stale"}
    expected |= {"dropped_zero_variance", "dropped_overflow", "reservoir_score_mean"}
    assert set(_buffer().stats()) == {f"replay/{k}" for k in expected}


def test_groups_to_arrays_round_trip():
    """Groups of different shapes, NaN rewards and meta survive the flat arrays + JSON exactly; meta entries that do
    not survive JSON unchanged (an array, a tuple) are left out. An empty list gives empty arrays."""
    g1 = _group("a", 0.5, version=3, n=2, t=4, prompt_len=5)
    g1.rewards[1] = np.nan
    g1.meta = {"text": "hi", "n": 2, "array": np.zeros(2), "tuple": (1, 2)}
    g2 = _group("b", 0.0, version=4, n=3, t=1, prompt_len=1)
    g2.truncated[2] = True
    arrays, metas = groups_to_arrays([g1, g2], "x.")
    assert all(a.dtype != object for a in arrays.values()) and all(k.startswith("x.") for k in arrays)
    back = groups_from_arrays(arrays, json.loads(json.dumps(metas)), "x.")
    assert back[0].meta == {"text": "hi", "n": 2}
    g1.meta = {"text": "hi", "n": 2}
    assert _same(back[0], g1) and _same(back[1], g2)
    empty_arrays, empty_metas = groups_to_arrays([], "e.")
    assert groups_from_arrays(empty_arrays, empty_metas, "e.") == []


def test_state_dict_round_trip_reproduces_future_samples():
    """Build a buffer with a reservoir (scores 0.9, 0.5, 0.4 of different shapes), a mixed fresh queue and a used RNG;
    save it through np.savez (loaded with allow_pickle=False) and JSON; restore into a buffer seeded differently.
    Both must then return identical groups and stats for identical future calls (draws depend on the RNG state and
    the heap order)."""
    cfg = ReplayConfig(replay_buffer_size=3, zero_variance="replay", max_staleness=2)
    original = ReplayBuffer(cfg, seed=7)
    original.add([_group(f"s{s}", s, n=2 + i, t=1 + i) for i, s in enumerate((0.9, 0.5, 0.4, 0.1))])
    original.add([_group("zero", 0.0)] * 3)
    original.sample(5, 0)
    original.add([_group("q1", 0.0, version=1), _group("q2", 0.8, version=2), _group("q3", 0.0, version=2)])
    arrays, meta = original.state_dict()
    blob = io.BytesIO()
    np.savez(blob, **arrays)
    blob.seek(0)
    with np.load(blob, allow_pickle=False) as npz:
        loaded = {k: npz[k] for k in npz.files}
    restored = ReplayBuffer(cfg, seed=12345)
    restored.load_state_dict(loaded, json.loads(json.dumps(meta)))
    assert restored.stats() == original.stats()
    assert all(_same(a, b) for a, b in zip(restored.reservoir, original.reservoir))
    for step in range(20):
        batch = [_group(f"n{step}", 0.0, version=step), _group(f"m{step}", 0.1 * (step % 5), version=step)]
        original.add(batch)
        restored.add(batch)
        a, b = original.sample(3, step), restored.sample(3, step)
        assert (a is None) == (b is None), step
        assert a is None or all(_same(x, y) for x, y in zip(a, b)), step
    assert restored.stats() == original.stats()
    assert original.stats()["replay/substituted"] > 10  # the draws were exercised


def test_state_written_with_the_old_prompt_ids_key_loads():
    """States are written with ``prompt_token_ids``; a checkpoint's replay.npz written before the rename holds the
    prompt tokens under ``prompt_ids`` and still loads, through np.savez and JSON, to the same groups."""
    original = ReplayBuffer(ReplayConfig(replay_buffer_size=2, zero_variance="replay", max_staleness=2), seed=3)
    original.add([_group("r1", 0.9, prompt_len=3), _group("r2", 0.5, prompt_len=1)])
    original.sample(2, 0)
    original.add([_group("q1", 0.0, version=1, prompt_len=4), _group("q2", 0.7, version=1, prompt_len=2)])
    arrays, meta = original.state_dict()
    assert {"fresh.prompt_token_ids", "reservoir.prompt_token_ids"} <= set(arrays)
    assert not any(k.endswith(".prompt_ids") for k in arrays)
    old = {k.replace(".prompt_token_ids", ".prompt_ids"): v for k, v in arrays.items()}
    blob = io.BytesIO()
    np.savez(blob, **old)
    blob.seek(0)
    with np.load(blob, allow_pickle=False) as npz:
        loaded = {k: npz[k] for k in npz.files}
    restored = ReplayBuffer(original.cfg, seed=99)
    restored.load_state_dict(loaded, json.loads(json.dumps(meta)))
    assert restored.stats() == original.stats()
    assert len(restored.reservoir) == 2 and all(_same(a, b) for a, b in zip(restored.reservoir, original.reservoir))
    a, b = restored.sample(2, 1), original.sample(2, 1)
    assert a is not None and len(a) == 2 and all(_same(x, y) for x, y in zip(a, b))


def test_token_versions_round_trip_and_old_states_load():
    """A group sampled across a weight load (continuous generation) keeps each token's version through the flat
    arrays; a one-version group comes back with None; arrays written before continuous generation (no
    ``token_versions``) load with None."""
    g1 = _group("a", 0.5, version=3, n=2, t=4)
    g1.token_versions = np.array([[3, 3, 4, 4], [3, 4, 5, 5]], dtype=np.int32)
    g2 = _group("b", 0.0, version=4, n=3, t=1)
    arrays, metas = groups_to_arrays([g1, g2], "x.")
    np.testing.assert_array_equal(arrays["x.token_versions"], [3, 3, 4, 4, 3, 4, 5, 5, 4, 4, 4])
    back = groups_from_arrays(arrays, json.loads(json.dumps(metas)), "x.")
    np.testing.assert_array_equal(back[0].token_versions, g1.token_versions)
    assert back[0].token_versions.dtype == np.int32 and back[1].token_versions is None
    assert _same(back[0], g1) and _same(back[1], g2)
    old = {k: v for k, v in arrays.items() if k != "x.token_versions"}
    assert [g.token_versions for g in groups_from_arrays(old, metas, "x.")] == [None, None]


def test_version_span_and_per_token_versions():
    """Versions [[3, 3, 4, 4], [3, 4, 5, 5]] with the second row 3 tokens long: its padding (5 at index 3) is not
    one of the model's tokens, so the span is 5 - 3 = 2 from index 2; with one version throughout, 0."""
    g = _group("a", 0.5, version=3, n=2, t=4)
    g.completion_lengths = np.array([4, 3], dtype=np.int32)
    g.token_versions = np.array([[3, 3, 4, 4], [3, 4, 5, 9]], dtype=np.int32)
    assert g.version_span == 2
    np.testing.assert_array_equal(g.versions, g.token_versions)
    plain = _group("b", 0.5, version=6)
    assert plain.version_span == 0 and (plain.versions == 6).all()
    with pytest.raises(ValueError, match="token_versions"):
        _group("c", 0.5).__class__(**{**plain.__dict__, "token_versions": np.zeros((1, 1), np.int32)})


def test_a_pull_that_drops_groups_returns_at_once_so_the_driver_hears_of_them():
    """The replay actor's ``sample_with_stats`` (its class, on one event loop, no Ray): with only a stale group
    queued, the learner's pull drops it and returns None with the drop in its stats before waiting at all, so the
    driver's admission (which counts the group as live until it hears) can request more. With nothing to drop the
    pull waits, and a group's arrival completes it. Done-ness is checked after the loop has run the task as far
    as it can go without new events (no timing involved: the timeout is an hour)."""
    import asyncio

    from rlfleet.replay.actor import ReplayActor

    async def scenario():
        actor = ReplayActor(ReplayConfig(max_staleness=1), seed=0)
        await actor.add([_group("stale", version=0)])
        pull = asyncio.ensure_future(actor.sample_with_stats(1, 5, 3600.0))
        for _ in range(10):
            await asyncio.sleep(0)
        assert pull.done()
        batch, stats = pull.result()
        assert batch is None and stats["replay/dropped_stale"] == 1
        waiting = asyncio.ensure_future(actor.sample_with_stats(1, 5, 3600.0))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not waiting.done()  # nothing dropped: it waits for a group
        await actor.add([_group("fresh", version=5)])
        batch, _ = await waiting
        assert _ids(batch) == ["fresh"]

    asyncio.run(scenario())


def test_a_fenced_request_says_what_it_delivered_and_its_later_groups_are_discarded():
    """A continuous engine's request hands its groups on as made, under a key. The replay actor (its class, on one
    event loop, no Ray) keeps the prompt ids each key delivered: fencing the key (its generator died) returns them
    and discards whatever of it arrives later, since the driver re-issued those prompts; a key whose result reached
    the driver is forgotten, and one never seen fences to nothing. Groups without a key are untouched."""
    import asyncio

    from rlfleet.replay.actor import ReplayActor

    async def scenario():
        actor = ReplayActor(ReplayConfig(max_staleness=4, zero_variance="keep"), seed=0)
        await actor.add([_group("a"), _group("b")], None, "gen-0@0#1")
        await actor.add([_group("c")], None, "gen-0@0#2")
        await actor.add([_group("plain")])
        await actor.add([_group("a")], None, "gen-0@0#2")  # the same prompt may come twice in one request
        await actor.forget(["gen-0@0#1"])
        assert await actor.fence(["gen-0@0#1", "gen-0@0#2", "never-seen"]) == {
            "gen-0@0#1": [], "gen-0@0#2": ["c", "a"], "never-seen": []}
        stats = await actor.add([_group("d"), _group("e")], None, "gen-0@0#2")  # arrives after the fence
        assert stats["replay/fenced_groups"] == 2
        assert stats["replay/fresh_size"] == 5  # a, b, c, plain, a: the fenced request's late groups are not in it
        assert actor.delivering == {}

    asyncio.run(scenario())
