"""Connecting to Ray and placing the run's actors.

``connect`` joins the cluster at ``cluster.address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else starts a
local cluster quietly (the embedded default), in the job's own namespace ``rlfleet-<job name>``: its named actors
(``rlfleet-learner``, ``rlfleet-generator-<i>``, ``rlfleet-control``) do not clash with another job's, and
``rlfleet scale --job NAME`` finds them.

Every actor that needs resources gets a placement group of its own, one bundle: the learner's is reserved before
the job starts (a request the cluster can never satisfy fails at once, naming the missing resource); the
generation actors' are requested one by one by the generator pool, which starts each actor as its group becomes
ready, so a job starts with ``min`` generators and grows as the cluster gains room.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlfleet.cluster.memory import GIB, MemoryEstimate, memory_problems
from rlfleet.cluster.signals import RunStopped, wait_any
from rlfleet.config import ClusterConfig, RLFleetConfig
from rlfleet.errors import ClusterError

log = logging.getLogger(__name__)


def job_name(cfg: RLFleetConfig) -> str:
    return cfg.cluster.job_name or Path(cfg.output_dir).resolve().name


def job_namespace(name: str) -> str:
    return f"rlfleet-{name}"


def connect(cfg: ClusterConfig, namespace: str) -> str:
    """Connect to (or start) Ray in ``namespace``. Returns a short description of where the job runs. In a Ray
    session that is already initialised (tests, notebooks) its namespace is kept."""
    if ray.is_initialized():
        return "existing Ray session"
    # No runtime_env here: under `ray job submit` the job's own (deploy/runtime_env.yaml) applies, and Ray refuses
    # to merge a second one; the engine sets its vLLM environment defaults itself inside each actor.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=True)
        return f"Ray cluster at {address}"
    num_cpus = local_cpus(cfg)  # the machine's cores: generators beyond them wait for room (see preflight_local)
    print(f"rlfleet: starting a local Ray cluster ({num_cpus} CPUs)", flush=True)
    ray.init(num_cpus=num_cpus, namespace=namespace, include_dashboard=False, logging_level=logging.WARNING)
    return f"local Ray cluster ({num_cpus} CPUs)"


def starts_local_cluster(cfg: ClusterConfig) -> bool:
    return not ray.is_initialized() and not cfg.address and not os.environ.get("RAY_ADDRESS")


def local_cpus(cfg: ClusterConfig) -> int:
    return cfg.local_num_cpus or os.cpu_count() or 1


def preflight_local(cfg: ClusterConfig, generators: int, memory: MemoryEstimate,
                    options: Callable[[int, float], list[str]] | None = None) -> None:
    """When rlfleet starts its own Ray cluster, refuse (before Ray starts) a job this machine cannot hold: the
    learner and ``generators`` need more cores than it has, or more memory than is available now (``options``: the
    changes that would fit, :func:`~rlfleet.cluster.memory.ways_out`)."""
    import psutil

    placed = 0 if cfg.colocate else generators  # colocated: the engine is in the learner's bundle
    need = cfg.learner_workers * cfg.learner_num_cpus + placed * cfg.generator_num_cpus
    learner = (f"learner {cfg.learner_num_cpus:g}" if cfg.learner_workers == 1
               else f"{cfg.learner_workers} learner ranks x {cfg.learner_num_cpus:g}")
    fleet = _fleet(cfg, placed, cfg.generator_num_cpus)
    problems = []
    if need > local_cpus(cfg):
        problems.append(
            f"the job needs {need:g} CPUs to start ({learner}{fleet}) but this machine has {local_cpus(cfg)}; "
            "lower cluster.num_generators "
            "(or give it a range, {min, max}, to grow where there is room), or set cluster.local_num_cpus to "
            "oversubscribe the cores on purpose")
    problems += memory_problems(memory, generators, psutil.virtual_memory().available / GIB,
                                "this machine (available now)", options)
    if problems:
        raise ClusterError("cannot start the job on this machine:\n" + "\n".join(f"  - {p}" for p in problems))


def _fleet(cfg: ClusterConfig, generators: int, each: float) -> str:
    """What a refusal says of the generators beside the learner: their count and size, or colocated, that the
    learner's bundle holds the engine."""
    if cfg.colocate:
        return " with its engine" if cfg.learner_workers == 1 else ", each with its engine"
    return f" + {generators} generators x {each:g}"


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def learner_bundle(cfg: ClusterConfig) -> dict[str, float]:
    """One learner rank's resources."""
    return bundle(cfg.learner_num_cpus, cfg.learner_num_gpus)


def learner_bundles(cfg: ClusterConfig) -> list[dict[str, float]]:
    """The learner group's placement: one bundle per rank (bundle r for rank r)."""
    return [learner_bundle(cfg)] * cfg.learner_workers


def generator_bundle(cfg: ClusterConfig) -> dict[str, float]:
    return bundle(cfg.generator_num_cpus, cfg.generator_num_gpus)


def fleet_size(cfg: ClusterConfig, total: dict[str, float]) -> int:
    """``cluster.num_generators: auto``: the generators that the cluster's ``total`` resources hold beside the learner
    group: the GPUs left over ``generator_num_gpus`` where generators use GPUs, else the CPUs left over
    ``generator_num_cpus``; at least 1."""
    learner = learner_bundles(cfg)
    kind, per = ("GPU", cfg.generator_num_gpus) if cfg.generator_num_gpus else ("CPU", cfg.generator_num_cpus)
    left = total.get(kind, 0.0) - sum(b.get(kind, 0.0) for b in learner)
    return max(1, int(left // per + 1e-9))


def check_feasible(cfg: ClusterConfig, nodes: list[dict[str, float]], num_generators: int | None = None) -> list[str]:
    """Problems that make starting the job impossible on a cluster whose nodes have ``nodes`` total resources:
    the learner plus ``num_generators`` (default ``cfg.min_generators``, what the job needs to start)."""
    n_gen = cfg.min_generators if num_generators is None else num_generators
    if cfg.colocate:  # the engine is in the learner's bundle
        n_gen = 0
    wanted = learner_bundles(cfg) + [generator_bundle(cfg)] * n_gen
    problems = []
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0) for b in wanted)
        have = sum(n.get(resource, 0) for n in nodes)
        per_learner, per_generator = wanted[0].get(resource, 0), generator_bundle(cfg).get(resource, 0)
        learner = (f"learner {per_learner:g}" if cfg.learner_workers == 1
                   else f"{cfg.learner_workers} learner ranks x {per_learner:g}")
        fleet = _fleet(cfg, n_gen, per_generator)
        if need > have:
            problems.append(
                f"the job needs {need:g} {resource} in all to start ({learner}{fleet}) but the cluster has "
                f"{have:g}; lower cluster.num_generators (its min) / "
                f"cluster.*_num_{resource.lower()}s{' / cluster.learner_workers' if cfg.learner_workers > 1 else ''} "
                "or add nodes"
            )
    biggest = {r: max((n.get(r, 0) for n in nodes), default=0) for r in ("CPU", "GPU")}
    for name, b in (("learner", wanted[0]), ("generator", generator_bundle(cfg))):
        if name == "generator" and not n_gen:
            continue
        for resource, amount in b.items():
            if amount > biggest[resource]:
                problems.append(
                    f"one {name} needs {amount:g} {resource} on a single node, but the largest node has "
                    f"{biggest[resource]:g}"
                )
    return problems


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def preflight_cluster(cfg: ClusterConfig, num_generators: int | None = None,
                      memory: MemoryEstimate | None = None,
                      options: Callable[[int, float], list[str]] | None = None) -> None:
    """Fail before any actor starts when the cluster can never hold the learner and the generators to start with
    (their resources; with ``memory``, also the memory its nodes report)."""
    nodes = [n["Resources"] for n in alive_nodes()]
    problems = check_feasible(cfg, nodes, num_generators)
    if memory is not None:
        have = sum(n.get("memory", 0) for n in nodes) / GIB
        problems += memory_problems(memory, cfg.min_generators if num_generators is None else num_generators,
                                    have, "the cluster's nodes (Ray's memory resource)", options)
    if problems:
        raise ClusterError("cannot place the job:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Placement:
    """One actor's placement group: a single bundle, or one per rank of a learner group (packed onto as few nodes
    as hold them)."""

    group: PlacementGroup

    @classmethod
    def request(cls, resources: dict[str, float] | list[dict[str, float]], name: str) -> Placement:
        """Ask for the bundle(s); returns at once (``ready()`` resolves when the cluster has placed them)."""
        bundles = resources if isinstance(resources, list) else [resources]
        return cls(placement_group(bundles, strategy="PACK", name=name))

    def ready(self) -> ray.ObjectRef:
        return self.group.ready()

    def options(self, bundle: int = 0) -> dict:
        """Ray options that run an actor in bundle ``bundle`` (a learner group's rank r in bundle r)."""
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.group,
                                                                        placement_group_bundle_index=bundle)}

    def release(self) -> None:
        try:
            remove_placement_group(self.group)
        except Exception:  # already removed (its job or the cluster went away)
            pass


def reserve(resources: dict[str, float] | list[dict[str, float]], name: str, timeout_s: float = 60.0) -> Placement:
    """Place the bundle(s) and wait until it is ready; a request that is not ready within ``timeout_s`` fails naming
    the cluster's free resources instead of hanging."""
    placement = Placement.request(resources, name)
    try:
        ready = wait_any([placement.ready()], timeout_s)  # raises RunStopped soon after a stop request
    except RunStopped:
        placement.release()
        raise
    if not ready:
        placement.release()
        raise ClusterError(
            f"{name}: the bundle {resources} was not placed after {timeout_s:.0f} s; the cluster's free resources "
            f"are {ray.available_resources()}; free them or ask for less"
        )
    return placement
