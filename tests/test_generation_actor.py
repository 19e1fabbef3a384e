"""Generation and replay actors on a local Ray cluster, with the real vLLM engine inside the generation actor."""

import numpy as np
import pytest
import torch

from rlfleet.generation.actor import make_generation_actor
from rlfleet.config import AlgorithmConfig, ClusterConfig, DataConfig, GenerationConfig, ModelConfig, ReplayConfig, RLFleetConfig
from rlfleet.data import PromptStream, load_prompt_dataset
from rlfleet.models import load_causal_lm
from rlfleet.replay.actor import make_replay_actor
from rlfleet.types import Group
from rlfleet.transport import WeightHandle
from rlfleet.transport.packed import WeightPacker

pytestmark = pytest.mark.ray
TIMEOUT_S = 300  # an actor's first call pays vLLM's import and start-up


def group(i: int, version: int = 0) -> Group:
    """A 2-completion group with rewards [0, 1]: std 1/sqrt(2), A = +-0.5 / (0.707107 + 1e-4)."""
    a = 0.5 / (2**-0.5 + 1e-4)
    return Group(
        prompt_id=str(i), prompt_token_ids=np.array([i], np.int32), completion_ids=np.ones((2, 3), np.int32),
        completion_lengths=np.array([3, 3], np.int32), behaviour_logprobs=np.full((2, 3), -1.0, np.float32),
        rewards=np.array([0, 1], np.float32), advantages=np.array([-a, a], np.float32),
        truncated=np.zeros(2, bool), policy_version=version, reward_std=2**-0.5,
    )


def test_replay_sample_waits_for_a_full_batch(ray_cluster):
    """sample(3) is submitted first and starts first (Ray runs one caller's calls in submission order); the stats
    call queued after two adds sees them still queued, so the sample did not take a short batch; the third add
    completes it. An empty buffer times out with None."""
    ray = ray_cluster
    replay = make_replay_actor(ReplayConfig(), seed=0, name="test-replay-wait")
    try:
        pending = replay.sample.remote(3, 0, TIMEOUT_S)
        ray.get(replay.add.remote([group(0), group(1)]), timeout=TIMEOUT_S)
        stats = ray.get(replay.stats.remote(), timeout=TIMEOUT_S)
        assert stats["replay/fresh_size"] == 2 and stats["replay/sampled"] == 0
        ack = ray.get(replay.add.remote([group(2)]), timeout=TIMEOUT_S)
        assert ack["replay/added"] == 3
        batch = ray.get(pending, timeout=TIMEOUT_S)
        assert [g.prompt_id for g in batch] == ["0", "1", "2"]
        assert ray.get(replay.sample.remote(1, 0, 0.2), timeout=TIMEOUT_S) is None
    finally:
        ray.kill(replay)


def test_replay_in_request_order_holds_a_later_request_until_the_earlier_one_ends(ray_cluster):
    """replay.consume_order: request. A sampler waiting for 2 groups gets none while request 1's group waits for
    request 0; request 0's delivery releases both, in request order. Request 3's group waits for request 2 until the
    driver skips it (lost with its generator); request 2's late delivery is then ignored."""
    ray = ray_cluster
    replay = make_replay_actor(ReplayConfig(consume_order="request"), seed=0, name="test-replay-order")
    try:
        pending = replay.sample.remote(2, 0, TIMEOUT_S)
        ack = ray.get(replay.add.remote([group(10)], 1), timeout=TIMEOUT_S)
        assert (ack["replay/held"], ack["replay/fresh_size"], ack["replay/added"]) == (1, 0, 0)
        ack = ray.get(replay.add.remote([group(0)], 0), timeout=TIMEOUT_S)
        assert (ack["replay/held"], ack["replay/added"]) == (0, 2)
        assert [g.prompt_id for g in ray.get(pending, timeout=TIMEOUT_S)] == ["0", "10"]
        ray.get(replay.add.remote([group(30)], 3), timeout=TIMEOUT_S)
        ray.get(replay.skip.remote([2]), timeout=TIMEOUT_S)
        ack = ray.get(replay.add.remote([group(20)], 2), timeout=TIMEOUT_S)
        assert (ack["replay/fresh_size"], ack["replay/ignored_deliveries"], ack["replay/held"]) == (1, 1, 0)
        assert [g.prompt_id for g in ray.get(replay.sample.remote(1, 0, TIMEOUT_S), timeout=TIMEOUT_S)] == ["30"]
    finally:
        ray.kill(replay)


def test_generation_actor_sends_groups_to_replay_and_loads_weights(ray_cluster, tiny_model_path):
    """Prompts of the built-in char_count task become groups inside the replay actor (never returned to the
    caller); weights passed as an ObjectRef load in place and later groups carry the new version."""
    ray = ray_cluster
    cfg = RLFleetConfig(
        model=ModelConfig(name_or_path=tiny_model_path),
        data=DataConfig(dataset="builtin:char_count"),
        generation=GenerationConfig(num_generations=4, generation_batch_size=12, max_completion_length=16),
        cluster=ClusterConfig(generator_num_cpus=1),
    )
    replay = make_replay_actor(cfg.replay, seed=0, name="test-replay-gen")
    actor = make_generation_actor(cfg, "test-replay-gen", index=0)
    try:
        assert ray.get(actor.ready.remote(), timeout=TIMEOUT_S) == ray.get_runtime_context().get_node_id()
        assert ray.get_actor("rlfleet-generator-0") is not None
        records = PromptStream(load_prompt_dataset(cfg.data, "train"), seed=0).next_batch(3)
        stats = ray.get(actor.generate.remote(records), timeout=TIMEOUT_S)
        assert stats["gen/groups"] == 3 and stats["errors/reward"] == 0 and stats["policy_version"] == 0
        assert ray.get(replay.stats.remote(), timeout=TIMEOUT_S)["replay/fresh_size"] == 3

        model = load_causal_lm(tiny_model_path)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        handle = WeightHandle("object_store", 1, ray.put(WeightPacker(torch.float32).pack(model.state_dict())))
        seconds = ray.get(actor.update_weights.remote(handle), timeout=TIMEOUT_S)
        assert seconds > 0 and ray.get(actor.version.remote(), timeout=TIMEOUT_S) == 1
        ray.get(actor.generate.remote(records[:1]), timeout=TIMEOUT_S)

        batch = ray.get(replay.sample.remote(4, 1, TIMEOUT_S), timeout=TIMEOUT_S)
        assert [g.prompt_id for g in batch] == [r["prompt_id"] for r in records] + [records[0]["prompt_id"]]
        assert [g.policy_version for g in batch] == [0, 0, 0, 1]
        for g in batch:
            assert g.size == 4 and g.behaviour_logprobs.shape == g.completion_ids.shape
            assert np.isfinite(g.rewards).all() and ((g.rewards >= 0) & (g.rewards <= 1)).all()
    finally:
        ray.kill(actor)
        ray.kill(replay)


def test_a_continuous_request_streams_each_handing_on_and_settles_every_prompt_once(ray_cluster, tiny_model_path):
    """stream() on the real continuous engine, as the pool calls it: a Ray streaming generator. Four prompts, one
    too long for the engine: however the engine's steps fall, every prompt is settled in exactly one item, the long
    one in the first (no group); each item carries the replay actor's ack and the engine's own figures; the replay
    actor holds the three groups, and its record of the request (what a fence would answer) lists those three. A
    request that follows another hands on after it."""
    ray = ray_cluster
    from collections import Counter

    from rlfleet.generation.actor import STREAM

    cfg = RLFleetConfig(
        model=ModelConfig(name_or_path=tiny_model_path, max_model_len=64),
        data=DataConfig(dataset="builtin:char_count"),
        generation=GenerationConfig(num_generations=2, generation_batch_size=8, max_completion_length=8,
                                    engine="continuous"),
        cluster=ClusterConfig(generator_num_cpus=1),
    )
    replay = make_replay_actor(cfg.replay, seed=0, name="test-replay-stream")
    actor = make_generation_actor(cfg, "test-replay-stream", index=0)
    try:
        stream_records = PromptStream(load_prompt_dataset(cfg.data, "train"), seed=0)
        records = stream_records.next_batch(4)
        records[2] = records[2] | {"prompt": "x " * 200, "prompt_id": "too-long"}
        stream = actor.stream.options(concurrency_group=STREAM).remote(records, 0, "request-0")
        assert isinstance(stream, ray.ObjectRefGenerator)
        items = [ray.get(ref, timeout=TIMEOUT_S) for ref in stream]
        settled = Counter(p for prompts, _ in items for p in prompts)
        assert settled == Counter(r["prompt_id"] for r in records)
        assert "too-long" in items[0][0]
        assert sum(stats["gen/groups"] for _, stats in items) == 3
        assert sum(stats["gen/prompts_too_long"] for _, stats in items) == 1
        assert all("replay/seq" in stats and "engine/busy_s" in stats for _, stats in items)
        assert sum(stats["engine/steps"] for _, stats in items) > 0
        assert ray.get(replay.stats.remote(), timeout=TIMEOUT_S)["replay/fresh_size"] == 3
        delivered = ray.get(replay.fence.remote(["request-0"]), timeout=TIMEOUT_S)["request-0"]
        assert Counter(delivered) == settled - Counter(["too-long"])

        # ordinal 1 follows ordinal 0 (rlfleet.generation.own_order), and is even called first: it hands its group
        # on after every group of the three prompts of ordinal 0 (alone, called first with one prompt, it would end
        # first); the replay actor's event numbers in the acks give the order
        before, after = stream_records.next_batch(3), stream_records.next_batch(1)
        follower = actor.stream.options(concurrency_group=STREAM).remote(after, 0, "request-2", 1, 0, True)
        earlier = actor.stream.options(concurrency_group=STREAM).remote(before, 0, "request-1", 0, 0, False)
        late = [ray.get(ref, timeout=TIMEOUT_S)[1]["replay/seq"] for ref in follower]
        early = [ray.get(ref, timeout=TIMEOUT_S)[1]["replay/seq"] for ref in earlier]
        assert late and early and min(late) > max(early)
    finally:
        ray.kill(actor)
        ray.kill(replay)


def test_a_reward_function_that_kills_its_process_costs_only_its_groups(ray_cluster, tiny_model_path):
    """The reward function exits its process on the first request: that request's groups are dropped and counted as
    lost, the call returns (the actor lives: a dead actor would raise here), and the next request, with a new reward
    worker, delivers every group."""
    ray = ray_cluster
    cfg = RLFleetConfig(
        model=ModelConfig(name_or_path=tiny_model_path),
        data=DataConfig(dataset="builtin:char_count"),
        generation=GenerationConfig(num_generations=2, generation_batch_size=6, max_completion_length=8),
        algorithm=AlgorithmConfig(reward_funcs=["tests.worker_rewards:exit_on_crash"]),
        cluster=ClusterConfig(generator_num_cpus=1),
    )
    replay = make_replay_actor(cfg.replay, seed=0, name="test-replay-crash")
    actor = make_generation_actor(cfg, "test-replay-crash", index=0, max_restarts=0)
    try:
        records = PromptStream(load_prompt_dataset(cfg.data, "train"), seed=0).next_batch(3)
        stats = ray.get(actor.generate.remote([r | {"crash": True} for r in records]), timeout=TIMEOUT_S)
        assert stats["gen/groups"] == 0 and stats["errors/reward"] == stats["errors/reward_lost"] == 3, stats
        stats = ray.get(actor.generate.remote([r | {"crash": False} for r in records]), timeout=TIMEOUT_S)
        assert stats["gen/groups"] == 3 and stats["errors/reward"] == 0, stats
        assert ray.get(replay.stats.remote(), timeout=TIMEOUT_S)["replay/fresh_size"] == 3
    finally:
        ray.kill(actor)
        ray.kill(replay)
