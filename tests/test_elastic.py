"""An elastic fleet on a multi-node Ray cluster (several raylets on this machine, real vLLM engines, tiny model).

The head node has room for the learner and one generator. The job asks for ``{min: 1, max: 3}``: it starts with
one generator, grows when a node joins mid-run, and when that node is removed mid-run it re-issues the lost
generator's prompts on the other and goes on. The job is stopped through its ``rlfleet-control`` actor once all of
that has been observed, so nothing here depends on how fast a step runs. Then every prompt the stream handed out is
accounted for exactly once: trained (the learner's own report, ``batches.jsonl``), queued in the replay actor, or
waiting to be re-issued (the final checkpoint).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.config import load_config
from tests.conftest import ray_test_env
from tests.test_faults import records_of, stop_and_join, train_in_thread, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    with ray_test_env():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        ray.init(address=cluster.address)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def issued_prompts(cfg, stream_state: dict) -> list[str]:
    """The prompt ids the driver's stream handed out, recomputed from the checkpointed cursor."""
    from rlfleet.data import PromptStream, load_prompt_dataset

    dataset = load_prompt_dataset(cfg.data, cfg.data.split, seed=cfg.seed)
    stream = PromptStream(dataset, seed=cfg.seed, shuffle=cfg.data.shuffle)
    total = stream_state["epoch"] * len(dataset) + stream_state["position"]
    return [str(r["prompt_id"]) for r in stream.next_batch(total)]


def prompt_ledger(cfg, out: Path) -> dict:
    """Where every prompt of a finished run is, by independent sources: ``trained`` (the learner's report,
    batches.jsonl), ``queued`` (the replay buffer) and ``to_reissue`` (the driver's state) in the final checkpoint,
    ``issued`` (what the stream handed out, recomputed from the checkpointed cursor); ``step`` of the checkpoint."""
    (_, replay_meta), driver = ckpt.read_state(ckpt.latest_checkpoint(out))
    return {
        "step": driver["step"],
        "trained": [p for line in (out / "batches.jsonl").read_text().splitlines()
                    for p in json.loads(line)["prompt_record_ids"]],
        "queued": [g["prompt_id"] for g in replay_meta["fresh"]],
        "to_reissue": [str(r["prompt_id"]) for r in driver["retry"]],
        "issued": issued_prompts(cfg, driver["stream"]),
    }


def test_fleet_grows_with_a_new_node_and_loses_nothing_when_it_leaves(cluster, tmp_path):
    cfg = load_config(DEPLOY / "grpo.yaml", [
        f"output_dir={tmp_path}", "learner.max_steps=100000", "checkpoint.save_steps=100000", "logging.plot=false",
        "cluster.num_generators={min: 1, max: 3}", "replay.zero_variance=keep", "replay.max_staleness=2",
        "generation.generation_batch_size=16", "learner.groups_per_step=2", "learner.micro_batch_size=16"])
    thread, result = train_in_thread(cfg)
    try:
        wait_for(lambda: len(records_of(tmp_path)) >= 2 or not thread.is_alive(), 300, "two steps on one generator")
        assert thread.is_alive(), result
        assert {r["fleet/generators"] for r in records_of(tmp_path)} == {1}  # the head has room for one

        node = cluster.add_node(num_cpus=1)
        wait_for(lambda: any(r["fleet/generators"] == 2 for r in records_of(tmp_path)) or not thread.is_alive(),
                 300, "the fleet to grow onto the new node")
        assert thread.is_alive(), result
        grown_at = len(records_of(tmp_path))

        cluster.remove_node(node)
        wait_for(lambda: (r := records_of(tmp_path)[-1])["fleet/removed"] == 1 and r["fleet/generators"] == 1
                 or not thread.is_alive(), 300, "the lost generator to leave the fleet")
        left_at = len(records_of(tmp_path))
        wait_for(lambda: len(records_of(tmp_path)) >= left_at + 3 or not thread.is_alive(), 300,
                 "three more steps on the remaining generator")
        assert thread.is_alive(), result
    finally:
        stop_and_join(thread)
    assert "error" not in result, result.get("error")

    records = records_of(tmp_path)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert records[grown_at - 1]["fleet/added"] == 2  # the first generator, then the one on the new node
    last = records[-1]
    assert (last["fleet/added"], last["fleet/removed"], last["fleet/generators"]) == (2, 1, 1)
    assert max(r["staleness/max"] for r in records) <= 2
    assert last["replay/dropped_stale"] == 0  # admission kept every group within the bound: none was wasted

    ledger = prompt_ledger(cfg, tmp_path)
    assert ledger["step"] == last["step"]
    assert len(ledger["trained"]) == last["step"] * 2
    # every prompt handed out is trained, queued or waiting to be re-issued: once, nothing lost, nothing twice
    assert Counter(ledger["trained"]) + Counter(ledger["queued"]) + Counter(ledger["to_reissue"]) == \
        Counter(ledger["issued"])


def test_a_generator_on_another_node_fetches_the_weights_beside_its_generation(cluster):
    """The object store's ``fetch`` (what a generator runs in its weights concurrency group while a request
    generates) pulls a publication's packed buffer from the learner's node into its own node's object store, so
    the load that follows reads local shared memory. Before it, only the publishing node holds the buffer."""
    import ray
    import torch

    from rlfleet.transport.object_store import ObjectStorePublisher, ObjectStoreReceiver

    node = cluster.add_node(num_cpus=0, resources={"far": 1})
    try:
        handle = ObjectStorePublisher(torch.float32).publish({"w": torch.arange(300_000, dtype=torch.float32)}, 1)
        here = ray.get_runtime_context().get_node_id()

        def holders() -> set[str]:
            return set(ray.experimental.get_object_locations([handle.payload])[handle.payload]["node_ids"])

        @ray.remote(num_cpus=0, resources={"far": 1})
        def fetch_there(handle) -> str:
            ObjectStoreReceiver().fetch(handle, timeout_s=60)
            return ray.get_runtime_context().get_node_id()

        assert holders() == {here}  # 1.2 MB: in shared memory, not inlined with the ref
        far = ray.get(fetch_there.remote(handle), timeout=120)
        assert far != here
        wait_for(lambda: holders() == {here, far}, 60, "the fetched buffer's location to reach its owner")
    finally:
        cluster.remove_node(node)
