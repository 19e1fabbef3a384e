"""Reward functions in their worker process: values as inline, a hanging call ends at its timeout, a crash costs
only its calls, async functions run side by side up to reward_concurrency. Real child processes, no Ray."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rlfleet.config import AlgorithmConfig
from rlfleet.generation.generator import Generator
from rlfleet.generation.reward_worker import InlineRewards, RewardWorker
from tests.test_generator import GEN, FakeEngine, fake_records
from tests.worker_rewards import async_hang_on_mode, hang_on_mode, length_reward, meet


@pytest.fixture
def worker_factory():
    made = []

    def make(funcs, timeout_s=60.0, concurrency=8):
        made.append(RewardWorker(funcs, timeout_s, concurrency))
        return made[-1]

    yield make
    for w in made:
        w.close()


def kwargs(n, **columns):
    return {"prompts": ["p"] * n, "completions": ["c"] * n, "completion_ids": [[1] * (i + 1) for i in range(n)],
            **columns}


def test_values_match_the_inline_call(worker_factory):
    worker = worker_factory([length_reward, length_reward])
    calls = [(0, kwargs(3)), (1, kwargs(2))]
    out = worker.run(calls)
    assert [o.status for o in out] == ["ok", "ok"]
    assert out[0].values == [1.0, 2.0, 3.0]
    assert out == InlineRewards([length_reward, length_reward]).run(calls)
    assert worker.is_async == [False, False] and worker.restarts == 0


def test_a_hanging_call_times_out_and_the_worker_goes_on(worker_factory):
    """The synchronous call never returns: the parent kills the worker at the timeout, reports the call as timed out,
    and the next call gets a fresh worker."""
    worker = worker_factory([hang_on_mode], timeout_s=1.0)
    (out,) = worker.run([(0, kwargs(2, mode=["hang", "ok"]))])
    assert out.status == "timeout" and "algorithm.reward_timeout_s=1 s" in out.detail, out
    (out,) = worker.run([(0, kwargs(2, mode=["ok", "ok"]))])
    assert out.status == "ok" and out.values == [1.0, 1.0]
    assert worker.restarts == 1


def test_a_crash_costs_only_its_calls(worker_factory):
    worker = worker_factory([hang_on_mode])
    (out,) = worker.run([(0, kwargs(1, mode=["exit"]))])
    assert out.status == "lost" and "exit code 7" in out.detail, out
    assert [o.values for o in worker.run([(0, kwargs(1, mode=["ok"]))] * 3)] == [[1.0]] * 3
    assert worker.restarts == 1


def test_async_calls_run_side_by_side_up_to_the_concurrency(worker_factory):
    """Three calls that each wait for the other two: they all answer with concurrency 3, and with concurrency 2 the
    two admitted wait for a third that cannot start, so they time out (and the third then finds the gate open)."""
    worker = worker_factory([meet], timeout_s=60.0, concurrency=3)
    assert worker.is_async == [True]
    out = worker.run([(0, kwargs(1, meet_count=[3]))] * 3)
    assert [o.values for o in out] == [[2.0]] * 3
    narrow = worker_factory([meet], timeout_s=1.0, concurrency=2)
    out = narrow.run([(0, kwargs(1, meet_count=[3]))] * 3)
    assert sorted(o.status for o in out) == ["ok", "timeout", "timeout"], out
    assert narrow.restarts == 0  # an async call is cancelled in the worker, which lives on


def test_callers_on_several_threads_share_one_worker(worker_factory):
    """A continuous engine scores each group on its own thread: three threads, one call each, meet in the worker
    (each waits for the other two), so their calls were in flight together and each got its own answer back."""
    worker = worker_factory([meet, length_reward], timeout_s=60.0, concurrency=4)
    results = [None] * 3

    def score(i):
        results[i] = worker.run([(0, kwargs(1, meet_count=[3])), (1, kwargs(i + 1))])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [[o.values for o in r] for r in results] == [[[2.0], [1.0 + j for j in range(i + 1)]] for i in range(3)]


def test_what_a_function_counts_comes_back_once(worker_factory):
    """The sandboxed code reward counts its programs' ends in ``outcomes``; the worker returns what it counted since
    the last report with each call (a pass and a failed assert, then one pass)."""
    from rlfleet.rewards import code_tests_reward

    worker = worker_factory([code_tests_reward])
    tests = "assert add(2, 3) == 5"
    good, bad = "```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```"
    (out,) = worker.run([(0, {"prompts": ["p"] * 2, "completions": [good, bad], "tests": [tests] * 2})])
    assert out.values == [1.0, 0.0] and out.counts == {"ok": 1, "failed": 1}, out
    (out,) = worker.run([(0, {"prompts": ["p"], "completions": [good], "tests": [tests]})])
    assert out.values == [1.0] and out.counts == {"ok": 1}, out


def test_a_function_that_cannot_be_pickled_is_named():
    with pytest.raises(Exception, match="local"):
        RewardWorker([lambda prompts, completions, **kw: [0.0] * len(completions)], 1.0, 1)


def test_the_generator_drops_a_timed_out_groups_and_counts_them(tokenizer):
    """Through the generator with a real worker: a synchronous call covers the request (all its groups dropped); an
    async call covers one group (only the hanging one dropped). errors/reward counts them, errors/reward_timeout
    too, and the generator goes on."""
    alg = AlgorithmConfig(reward_timeout_s=1.0)
    records = fake_records(3, mode=["ok", "hang", "ok"])
    for func, dropped in ((hang_on_mode, 3), (async_hang_on_mode, 1)):
        worker = RewardWorker([length_reward, func], alg.reward_timeout_s, alg.reward_concurrency)
        try:
            gen = Generator(FakeEngine(), tokenizer, GEN, alg, [length_reward, func], rewards=worker)
            groups, stats = gen.generate(records)
            assert stats["errors/reward"] == stats["errors/reward_timeout"] == dropped, stats
            assert stats["errors/reward_lost"] == 0
            assert [g.prompt_id for g in groups] == (["0", "2"] if dropped == 1 else [])
            groups, stats = gen.generate(fake_records(3, mode=["ok"] * 3))
            assert len(groups) == 3 and stats["errors/reward"] == 0
            extra = 1.0 if func is hang_on_mode else 3.0
            np.testing.assert_array_equal(groups[0].rewards, np.array([5, 2, 7, 3]) + extra)
        finally:
            worker.close()


@pytest.fixture(scope="module")
def tokenizer():
    from rlfleet.models import load_tokenizer

    return load_tokenizer("builtin:tiny")
