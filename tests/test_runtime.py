"""Placement: requests the cluster can never satisfy fail at once, naming what is missing."""

import time

import pytest

from rlfleet.cluster.runtime import ClusterError, bundles, check_feasible, reserve
from rlfleet.config import ClusterConfig


def test_bundles_learner_first_then_one_per_generator():
    cfg = ClusterConfig(num_generators=3, generator_num_gpus=1, learner_num_gpus=2, generator_num_cpus=4)
    assert bundles(cfg) == [{"CPU": 1, "GPU": 2}] + [{"CPU": 4, "GPU": 1}] * 3
    assert bundles(cfg, num_generators=0) == [{"CPU": 1, "GPU": 2}]


def test_feasibility_names_the_missing_resource():
    two_cpu_nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert check_feasible(ClusterConfig(num_generators=3), two_cpu_nodes) == []  # 4 CPUs in all, 1 per bundle
    problems = check_feasible(ClusterConfig(num_generators=4, generator_num_gpus=1), two_cpu_nodes)
    assert any("needs 4 GPU in all" in p and "the cluster has 0" in p for p in problems)
    assert any("needs 5 CPU in all" in p for p in problems)
    problems = check_feasible(ClusterConfig(num_generators=1, generator_num_cpus=3), two_cpu_nodes)
    assert problems == ["one generator needs 3 CPU on a single node, but the largest node has 2"]
    assert check_feasible(ClusterConfig(num_generators=2, placement_strategy="STRICT_SPREAD"), two_cpu_nodes) == [
        "STRICT_SPREAD needs 3 nodes, the cluster has 2"]


@pytest.mark.ray
def test_unsatisfiable_request_fails_fast_on_a_real_cluster(ray_cluster):
    start = time.monotonic()
    with pytest.raises(ClusterError, match="needs 1 GPU in all"):
        reserve(ClusterConfig(num_generators=1, generator_num_gpus=1))
    assert time.monotonic() - start < 10  # no waiting for resources that will never come
    placement = reserve(ClusterConfig(num_generators=2))  # 3 of the fixture's 4 CPUs
    placement.release()
