"""The generation actor: a thin Ray shell around :class:`~rlfleet.generation.generator.Generator` and its engine.

The class carries no ``@ray.remote`` decorator: resources come from the config at launch
(:func:`make_generation_actor`); the engine comes from a factory (the vLLM :class:`Engine` by default; benchmarks
pass a stand-in, :mod:`bench.standin`). Groups go straight to the replay actor; the caller gets a small stats dict.
Batched engine: Ray runs one method at a time on the actor (its default concurrency group), in the order they were
called, so a weight update never lands in the middle of a generation and requests deliver their groups in the order
queued; only a broadcast round's receive runs beside it (``weights`` group), and it only stages. Continuous engine
(:mod:`rlfleet.generation.continuous`): generate() calls run side by side (``stream`` group), each group's prompt
joining the running engine, and a weight update loads between two engine steps while they generate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray

from rlfleet.config import RLFleetConfig
from rlfleet.errors import quiet_kill_in_finalizers
from rlfleet.generation.continuous import ContinuousEngine
from rlfleet.generation.engine import Engine
from rlfleet.generation.generator import Generator
from rlfleet.generation.own_order import OwnOrder
from rlfleet.models import load_tokenizer
from rlfleet.transport import TRANSPORTS, WeightHandle, capabilities, make_receiver

# (cfg, seed) -> an engine with sample and what the transport's receiver loads through (rlfleet.transport.WeightLoader)
EngineFactory = Callable[[RLFleetConfig, int], Any]


def vllm_engine(cfg: RLFleetConfig, seed: int) -> Engine | ContinuousEngine:
    # a transport with a membership reaches the engine through vLLM's weight-transfer API (rlfleet's gloo backend)
    transfer = "gloo" if capabilities(cfg.cluster.weight_transport).membership else None
    engine = Engine(cfg.model, cfg.generation, seed=seed, log_level=cfg.logging.engine_log_level,
                    weight_transfer=transfer)
    if cfg.generation.engine == "continuous":
        return ContinuousEngine(engine, cfg.generation.kv_on_update)
    return engine


STREAM = "stream"  # the concurrency group of generate() calls on a continuous engine: they run side by side


class GenerationActor:
    """One engine with the policy's weights (seeded ``cfg.seed + index``), its generator, and the replay actor
    looked up by name (``replay``) in the job's namespace.

    The replay actor is passed by name, not by handle: Ray keeps an actor handle given to a restartable actor's
    constructor as an argument in the object store (and warns that a restart fails once it goes out of scope,
    ray#53727); a name is looked up again on every restart.

    It keeps one receiver per transport for its life (each holds its transport's receive state); a handle is loaded
    by the receiver of the transport it names, the rounds of ``cluster.weight_transport`` are received by that
    transport's."""

    def __init__(self, cfg: RLFleetConfig, replay: str, index: int = 0, engine_factory: EngineFactory = vllm_engine):
        quiet_kill_in_finalizers()
        self.cfg = cfg
        self.replay = ray.get_actor(replay)
        self.engine = engine_factory(cfg, cfg.seed + index)
        self.receivers = {name: make_receiver(name) for name in TRANSPORTS}
        self.receiver = self.receivers[cfg.cluster.weight_transport]  # the one rounds are pushed to
        tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        self.generator = Generator.from_config(self.engine, tokenizer, cfg)
        self.own_order = OwnOrder(cfg.cluster.timeout_s)  # continuous engines: requests that follow the earlier

    def generate(self, records: list[dict], seq: int | None = None, version: int | None = None) -> dict[str, float]:
        """Generate groups for ``records``, hand them to the replay actor (waiting for its ack), return stats with the
        ack's (``replay/*``: the driver's admission hears the replay actor's drops from them). ``seq``: the
        request's number (``replay.consume_order: request``); the replay actor then hears of the request even when
        every group was dropped, since later requests wait for it.

        On a continuous engine the pool calls this in the ``stream`` concurrency group, many at once, and the
        weight load queued before it may still be on its way: ``version`` (the weights the driver admitted the
        request at) is waited for first, so no token of it is older."""
        if version is not None and isinstance(self.engine, ContinuousEngine):
            self.engine.wait_for_version(version, self.cfg.cluster.timeout_s)
        groups, stats = self.generator.generate(records)
        if isinstance(self.engine, ContinuousEngine):
            stats |= self.engine.stats()
        if groups or seq is not None:
            stats |= ray.get(self.replay.add.remote(groups, seq), timeout=self.cfg.cluster.timeout_s)
        return stats

    @ray.method(num_returns="streaming")
    def stream(self, records: list[dict], version: int, request: str, ordinal: int | None = None,
               low: int | None = None, follows: bool = False) -> Iterator[tuple[list[str], dict[str, float]]]:
        """A continuous engine's request, a Ray streaming generator: generate groups for ``records`` with no token
        older than ``version``, each handed to the replay actor the moment it is made
        (:meth:`Generator.generate_each`), under the request's key ``request``. Each handing-on yields, once the
        replay actor has acked it, the prompt ids it settled and its stats, with the ack's and the engine's since
        the last report: the driver hears of each group as it is made, so the room it leaves in the engine is
        filled at once, and no request waits for its slowest group.

        ``ordinal``: the request's number on this generator (``low``: the lowest the driver has not heard the end
        of). A request that ``follows`` starts once the generator's earlier requests have sampled their last tokens,
        and hands on after their last groups (:mod:`rlfleet.generation.own_order`).

        The replay actor records which prompts of ``request`` it has until the driver has heard the stream end: if
        this actor dies first, the driver fences the request (:meth:`ReplayActor.fence`) and re-issues only the
        prompts the replay actor does not have, so no prompt is trained twice or lost."""
        if ordinal is None:
            yield from self._stream(records, version, request)
            return
        try:
            self.own_order.begin(ordinal, ordinal if low is None else low, follows)
            yield from self._stream(records, version, request, lambda: self.own_order.sampled(ordinal),
                                    (lambda: self.own_order.before_handing_on(ordinal)) if follows else None)
        finally:
            self.own_order.finished(ordinal)

    def _stream(self, records: list[dict], version: int, request: str, sampled: Callable[[], None] | None = None,
                before_handing_on: Callable[[], None] | None = None
                ) -> Iterator[tuple[list[str], dict[str, float]]]:
        self.engine.wait_for_version(version, self.cfg.cluster.timeout_s)
        for prompts, groups, stats in self.generator.generate_each(records, sampled):
            if before_handing_on is not None:
                before_handing_on()
            ack = ray.get(self.replay.add.remote(groups, None, request), timeout=self.cfg.cluster.timeout_s)
            yield prompts, stats | ack | self.engine.stats()

    def evaluate(self, records: list[dict], n: int, temperature: float | None, step: int) -> dict[str, float]:
        """Score ``n`` samples per held-out record with the current weights (``Generator.evaluate``); nothing goes to
        the replay actor. ``step`` (the learner step evaluated) comes back as ``eval/step``."""
        if isinstance(self.engine, ContinuousEngine):  # step's weights throughout: loads wait for it
            with self.engine.pinned():
                return self.generator.evaluate(records, n, temperature) | {"eval/step": float(step)}
        return self.generator.evaluate(records, n, temperature) | {"eval/step": float(step)}

    def update_weights(self, handle: WeightHandle) -> float:
        """Load the published weights in place through the transport; returns the seconds it took."""
        start = time.perf_counter()
        self.receivers[handle.transport].apply(handle, self.engine)  # the handle names its transport
        return time.perf_counter() - start

    @ray.method(concurrency_group="weights")
    def fetch_weights(self, handle: WeightHandle) -> None:
        """Bring published weights to this node while a request generates, for the load queued behind it."""
        self.receivers[handle.transport].fetch(handle, self.cfg.cluster.timeout_s)

    @ray.method(concurrency_group="weights")
    def join_weight_group(self, init_info: dict) -> None:
        """Join the learner's weight-transfer group (``broadcast`` transport), beside a generation in flight."""
        self.receiver.join(init_info, self.engine)

    @ray.method(concurrency_group="weights")
    def receive_weights(self, update_info: dict, version: int) -> None:
        """Take part in a broadcast round (staged; loaded before the next request by ``update_weights``)."""
        self.receiver.receive(update_info, version, self.engine)

    def version(self) -> int:
        return self.engine.version

    def ready(self) -> str:
        """The engine is loaded; returns the id of the node the actor runs on (the pool watches that node)."""
        return ray.get_runtime_context().get_node_id()


def make_generation_actor(cfg: RLFleetConfig, replay: str, index: int = 0,
                          engine_factory: EngineFactory = vllm_engine, **options):
    """Start ``GenerationActor`` number ``index`` named ``rlfleet-generator-{index}``, resources from ``cfg.cluster``,
    sending its groups to the replay actor named ``replay``.

    ``options`` override the ``.options()`` defaults (e.g. a placement-group scheduling strategy).
    """
    opts = dict(
        name=f"rlfleet-generator-{index}",
        num_cpus=cfg.cluster.generator_num_cpus,
        num_gpus=cfg.cluster.generator_num_gpus,
        max_restarts=cfg.cluster.max_restarts,
        # its generate() calls run in the order queued, which admission relies on (rlfleet.cluster.admission);
        # Ray's default for an actor of one thread per concurrency group, stated so that no change loses it
        allow_out_of_order_execution=False,
    ) | options
    if cfg.logging.engine_log_level in ("WARNING", "ERROR") and "TORCH_CPP_LOG_LEVEL" not in os.environ:
        # vLLM's CPU worker binds memory to the NUMA node through a torch op that warns about it at every start;
        # torch's C++ log level is read once, when the process starts (Ray merges env_vars with the job's)
        opts.setdefault("runtime_env", {"env_vars": {"TORCH_CPP_LOG_LEVEL": "ERROR"}})
    # the "weights" group takes broadcast rounds beside a generation; other calls run one at a time, except
    # generate() on a continuous engine, called in the "stream" group (as many at once as groups kept in flight)
    groups = {"weights": 1}
    if cfg.generation.engine == "continuous":
        from rlfleet.models import inflight_groups

        groups[STREAM] = inflight_groups(cfg)
    actor = ray.remote(concurrency_groups=groups)(GenerationActor)
    return actor.options(**opts).remote(cfg, replay, index, engine_factory)
