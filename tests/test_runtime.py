"""Placement: requests the cluster can never satisfy fail at once, naming what is missing."""

import pytest

from rlfleet.cluster.runtime import (ClusterError, check_feasible, fleet_size, generator_bundle, learner_bundle,
                                    reserve)
from rlfleet.config import ClusterConfig


def test_bundles_one_per_actor():
    cfg = ClusterConfig(num_generators=3, generator_num_gpus=1, learner_num_gpus=2, generator_num_cpus=4)
    assert learner_bundle(cfg) == {"CPU": 1, "GPU": 2}
    assert generator_bundle(cfg) == {"CPU": 4, "GPU": 1}


def test_feasibility_names_the_missing_resource():
    two_cpu_nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert check_feasible(ClusterConfig(num_generators=3), two_cpu_nodes) == []  # 4 CPUs in all, 1 per actor
    problems = check_feasible(ClusterConfig(num_generators=4, generator_num_gpus=1), two_cpu_nodes)
    assert any("needs 4 GPU in all to start" in p and "the cluster has 0" in p for p in problems)
    assert any("needs 5 CPU in all to start" in p for p in problems)
    problems = check_feasible(ClusterConfig(num_generators=1, generator_num_cpus=3), two_cpu_nodes)
    assert problems == ["one generator needs 3 CPU on a single node, but the largest node has 2"]


def test_an_elastic_fleet_needs_only_its_min_to_start():
    """{min: 1, max: 8}: 1 + 1 CPUs start it on a 2-CPU cluster; the other 7 generators wait for room."""
    one_node = [{"CPU": 2.0}]
    assert check_feasible(ClusterConfig(num_generators={"min": 1, "max": 8}), one_node) == []
    assert check_feasible(ClusterConfig(num_generators={"min": 2, "max": 8}), one_node) == [
        "the job needs 3 CPU in all to start (learner 1 + 2 generators x 1) but the cluster has 2; lower "
        "cluster.num_generators (its min) / cluster.*_num_cpus or add nodes"]


def test_a_colocated_job_needs_only_the_learners_bundle():
    """Colocated, the engine runs in the learner's bundle: 2 CPUs for the learner fit a 2-CPU node, where a learner
    of 2 and a generator of 1 need 3; a generator bundle too large for any node does not matter."""
    one_node = [{"CPU": 2.0}]
    separate = ClusterConfig(learner_num_cpus=2, generator_num_cpus=3)
    assert any("needs 5 CPU in all" in p for p in check_feasible(separate, one_node))
    assert check_feasible(ClusterConfig(learner_num_cpus=2, generator_num_cpus=3, colocate=True), one_node) == []
    assert check_feasible(ClusterConfig(learner_num_cpus=3, colocate=True), one_node) == [
        "the job needs 3 CPU in all to start (learner 3 with its engine) but the cluster has 2; lower "
        "cluster.num_generators (its min) / cluster.*_num_cpus or add nodes",
        "one learner needs 3 CPU on a single node, but the largest node has 2"]


@pytest.mark.ray
def test_auto_fleet_counts_what_the_learner_leaves():
    """2 CPUs, a 1-CPU learner: 1 generator. 16 CPUs, 2 learner ranks x 2 CPUs, 2 CPUs per generator: (16 - 4) / 2
    = 6. GPU generators count GPUs: 8 GPUs, 2 learner ranks x 1 GPU, 1 GPU each: 6, whatever the CPUs. No room
    left: still 1 (the job's min, which the start-up check then refuses or waits for)."""
    auto = {"num_generators": "auto"}
    cfg = ClusterConfig(**auto)
    assert cfg.min_generators == 1 and cfg.max_generators is None
    assert fleet_size(cfg, {"CPU": 2.0}) == 1
    assert fleet_size(ClusterConfig(**auto, learner_workers=2, learner_num_cpus=2, generator_num_cpus=2),
                      {"CPU": 16.0}) == 6
    assert fleet_size(ClusterConfig(**auto, learner_workers=2, learner_num_gpus=1, generator_num_gpus=1),
                      {"CPU": 4.0, "GPU": 8.0}) == 6
    assert fleet_size(ClusterConfig(**auto, learner_num_cpus=4), {"CPU": 4.0}) == 1
    assert fleet_size(ClusterConfig(**auto, generator_num_cpus=0.5), {"CPU": 3.0}) == 4


def test_unsatisfiable_request_fails_fast_on_a_real_cluster(ray_cluster):
    with pytest.raises(ClusterError, match="was not placed after 2 s"):  # the timeout given, not a hang
        reserve({"CPU": 1, "GPU": 1}, "needs-a-gpu", timeout_s=2)
    placement = reserve({"CPU": 3}, "three-of-four")  # 3 of the fixture's 4 CPUs
    placement.release()
