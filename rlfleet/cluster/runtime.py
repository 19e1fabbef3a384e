"""Connecting to Ray and reserving the run's resources.

``connect`` joins the cluster at ``cluster.address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else starts a
local cluster quietly: the embedded default. ``reserve`` creates one placement group: bundle 0 for the learner,
bundles 1..N for the generation actors; a request the cluster can never satisfy fails at once with a message naming
the missing resource, and one that does not become ready within the timeout fails instead of hanging.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlfleet.config import ClusterConfig
from rlfleet.errors import ClusterError

log = logging.getLogger(__name__)

def connect(cfg: ClusterConfig) -> str:
    """Connect to (or start) Ray. Returns a short description of where the job runs."""
    if ray.is_initialized():
        return "existing Ray session"
    # No runtime_env here: under `ray job submit` the job's own (deploy/runtime_env.yaml) applies, and Ray refuses
    # to merge a second one; the engine sets its vLLM environment defaults itself inside each actor.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return f"Ray cluster at {address}"
    needed = cfg.learner_num_cpus + cfg.num_generators * cfg.generator_num_cpus
    num_cpus = cfg.local_num_cpus or max(int(needed + 0.999), os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return f"local Ray cluster ({num_cpus} CPUs)"


@dataclass
class Placement:
    """The run's placement group; bundle 0 is the learner, bundle 1 + i generator i."""

    group: PlacementGroup

    def learner(self) -> dict:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=0)}

    def generator(self, index: int) -> dict:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=1 + index)}

    def release(self) -> None:
        remove_placement_group(self.group)


def bundles(cfg: ClusterConfig, num_generators: int | None = None) -> list[dict[str, float]]:
    def bundle(cpus: float, gpus: float) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    return [bundle(cfg.learner_num_cpus, cfg.learner_num_gpus)] + [
        bundle(cfg.generator_num_cpus, cfg.generator_num_gpus)
        for _ in range(cfg.num_generators if num_generators is None else num_generators)
    ]


def check_feasible(cfg: ClusterConfig, nodes: list[dict[str, float]], num_generators: int | None = None) -> list[str]:
    """Problems that make the request impossible on a cluster whose nodes have ``nodes`` total resources."""
    wanted = bundles(cfg, num_generators)
    n_gen = len(wanted) - 1
    problems = []
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0) for b in wanted)
        have = sum(n.get(resource, 0) for n in nodes)
        per_learner, per_generator = wanted[0].get(resource, 0), wanted[-1].get(resource, 0) if n_gen else 0
        if need > have:
            problems.append(
                f"the job needs {need:g} {resource} in all (learner {per_learner:g} + {n_gen} generators x "
                f"{per_generator:g}) but the cluster has {have:g}; lower cluster.num_generators / "
                f"cluster.*_num_{resource.lower()}s or add nodes"
            )
    biggest = {r: max((n.get(r, 0) for n in nodes), default=0) for r in ("CPU", "GPU")}
    for name, b in (("learner", wanted[0]), ("generator", wanted[-1])):
        for resource, amount in b.items():
            if amount > biggest[resource]:
                problems.append(
                    f"one {name} needs {amount:g} {resource} on a single node, but the largest node has "
                    f"{biggest[resource]:g}"
                )
    if cfg.placement_strategy == "STRICT_SPREAD" and len(wanted) > len(nodes):
        problems.append(f"STRICT_SPREAD needs {len(wanted)} nodes, the cluster has {len(nodes)}")
    return problems


def reserve(cfg: ClusterConfig, num_generators: int | None = None, timeout_s: float = 60.0) -> Placement:
    """Reserve every actor's resources before any actor starts; fail fast when impossible. ``num_generators``
    overrides the config's count (the DPO job reserves the learner's bundle only)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = check_feasible(cfg, nodes, num_generators)
    if problems:
        raise ClusterError("cannot place the job:\n" + "\n".join(f"  - {p}" for p in problems))
    group = placement_group(bundles(cfg, num_generators), strategy=cfg.placement_strategy, name="rlfleet")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(
            f"the placement group {bundles(cfg, num_generators)} ({cfg.placement_strategy}) was not ready after "
            f"{timeout_s:.0f} s: "
            f"the cluster's free resources are {ray.available_resources()}; free them or ask for less"
        )
    return Placement(group)
