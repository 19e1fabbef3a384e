"""The generator pool: the job's generation actors as one object that grows, shrinks and heals while the job runs.

Each member is one generation actor in a placement group of its own (one bundle). A member moves through

    placing --(its group is placed)--> starting --(engine loaded: ready())--> active <--> restarting
                                                                               |
                                                     removed: scaled down, node lost, restarts used up

The pool keeps ``target`` members (``cluster.num_generators``' max, or what ``rlfleet scale`` asked for): it asks
for placement groups until it has that many, and each starts its actor as soon as the cluster places it, so new
nodes are used while the job runs. Scaling down cancels placements not yet made, then stops idle actors, then
lets busy ones finish their request first (draining): nothing they generate is lost.

A member whose request fails has its prompts re-issued (``retry``, handed out before new prompts) and is either
restarted by Ray (``cluster.max_restarts``; the pool sends it the current weights before its next request) or, if
its node is gone, removed; a replacement is placed when the cluster has room. Every member gets the latest weights
before its first request. The pool does not decide how much to generate: the driver passes a budget from
:func:`rlfleet.cluster.admission.admission_budget`; the pool reports the versions and counts that function needs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from rlfleet.cluster.admission import LiveGroups, plan_request
from rlfleet.cluster.metrics import console, warn
from rlfleet.cluster.runtime import Placement
from rlfleet.cluster.signals import OUT_OF_MEMORY, wait_any
from rlfleet.errors import ActorLost, ClusterError
from rlfleet.transport import WeightHandle

PLACING, STARTING, ACTIVE, RESTARTING = "placing", "starting", "active", "restarting"


@dataclass
class Request:
    """A call queued on a generation actor: a generate() (or an evaluation), and the weight load queued before it."""

    future: ray.ObjectRef | ray.ObjectRefGenerator  # a stream()'s: one ref per handing-on of groups
    records: list[dict]  # its prompts not yet heard of (none for an evaluation)
    version: int  # the weights version it samples with
    sync_future: ray.ObjectRef | None = None  # the update_weights() queued right before it, if any
    evaluating: int | None = None  # an evaluation of this learner step
    seq: int | None = None  # its number in request order (replay.consume_order: request)
    key: str | None = None  # a continuous engine's request, its groups handed on as made: its key for the replay
    ordinal: int | None = None  # such a request's number on its member (rlfleet.generation.own_order)
    follows: bool = False  # it hands on after the member's earlier requests: admitted with them left out
    heard: Counter = field(default_factory=Counter)  # its prompt ids settled (handed on or dropped) so far


def without_prompts(records: list[dict], prompts: Counter) -> list[dict]:
    """``records`` less one record per count of its prompt id in ``prompts`` (a prompt may be in a request twice)."""
    left, kept = Counter(prompts), []
    for record in records:
        if left[str(record["prompt_id"])] > 0:
            left[str(record["prompt_id"])] -= 1
        else:
            kept.append(record)
    return kept


@dataclass
class Member:
    """One generation actor as the pool sees it."""

    index: int
    placement: Placement
    state: str = PLACING
    handle: ray.actor.ActorHandle | None = None
    node_id: str | None = None
    waiting: ray.ObjectRef | None = None  # placement ready / ready() / a restart's ready()
    version: int = -1  # weights version the actor holds (or will, once its queued update runs)
    requests: list[Request] = field(default_factory=list)  # queued on the actor, in the order it runs them
    draining: bool = False  # scaled down: removed once its requests return
    last_request: int = -1  # sequence number of its latest request: idle members are served least recent first
    incarnation: int = 0  # restarts so far: a restarted actor is a new process (a new weight-group member)
    streamed: int = 0  # continuous engines: requests queued on it so far, restarts included (the next ordinal)

    @property
    def evaluating(self) -> bool:
        return any(r.evaluating is not None for r in self.requests)

    @property
    def name(self) -> str:
        return f"rlfleet-generator-{self.index}"

    @property
    def key(self) -> str:
        """``<name>@<incarnation>``: the member as a weight transport with a membership (broadcast) knows it."""
        return f"{self.name}@{self.incarnation}"


StartActor = Callable[[int, dict], ray.actor.ActorHandle]  # (index, ray options) -> a GenerationActor handle


class GeneratorPool:
    """``start_actor(index, options)`` starts generation actor ``index`` with the given placement options;
    ``bundle`` is one generator's resources; ``prompts_per_request`` caps each request.

    ``skip_requests``: given, the groups are trained in request order (``replay.consume_order: request``): each
    training request is numbered, and the numbers of requests lost with their generator go to ``skip_requests``
    (the replay actor's ``skip``) as soon as the loss is known, so later requests' groups stop waiting for them.

    ``stream``: the members' engines are continuous; their generate() calls go to this concurrency group and run
    side by side. ``depth`` then counts groups generating, not requests (a member takes requests while it
    generates fewer), and ``prompts_per_request`` is as many as the bound and that room admit. In arrival order
    each request hands its groups to the replay actor as they are made (``stream()``, a Ray streaming generator,
    under a key), and the pool hears of each as it is made: it leaves the request, so its room in the engine is
    filled at once; each is numbered on its member (``ordinal``, for ``follow`` below). ``fence_requests(keys)``
    (the replay actor's ``fence``) says which prompts of the requests lost with their generator arrived, so only
    the others are re-issued, and ``forget_requests(keys)`` (its ``forget``, not waited for) tells it of the
    requests whose streams ended.

    ``follow``: where the bound admits nothing that starts at once on a continuous member generating, a request
    may *follow* the member's earlier ones (:mod:`rlfleet.generation.own_order`). The driver sets it at
    ``max_staleness`` 1, where the bound lets one batch generate beside the one being trained, so a generator runs
    one at a time anyway. With a deeper window a follower, which waits for every earlier request to end and takes
    the room the bound leaves, turns the continuous engine into a batched one: on long tails at ``max_staleness``
    4 one run of two fell to request batching's step (0.49 s against 0.35; bench/RESULTS.md section 23).

    ``place(bundle, name)``: a member's placement (default: a placement group of its own). ``colocated``: the
    member is the learner itself (``cluster.colocate``), placed with it: its loss is the learner's, raised as
    :class:`~rlfleet.errors.ActorLost` for the job to recover from its checkpoint, never restarted on its own."""

    def __init__(self, start_actor: StartActor, bundle: dict[str, float], target: int, prompts_per_request: int,
                 timeout_s: float, depth: int = 1, skip_requests: Callable[[list[int]], None] | None = None,
                 stream: str | None = None, place: Callable[[dict[str, float], str], Placement] = Placement.request,
                 colocated: bool = False, fence_requests: Callable[[list[str]], dict[str, list[str]]] | None = None,
                 forget_requests: Callable[[list[str]], None] | None = None, follow: bool = False):
        self.start_actor, self.bundle, self.place, self.colocated = start_actor, bundle, place, colocated
        # continuous engines: generate() calls go to this concurrency group and run side by side, so a member's own
        # requests may overtake each other; new weights go to every member at once, loaded in flight
        self.stream = stream
        self.target, self.prompts_per_request, self.timeout_s = target, prompts_per_request, timeout_s
        self.depth = depth  # requests queued on one generator at most (cluster.requests_per_generator)
        self.skip_requests, self.fence_requests, self.forget_requests = skip_requests, fence_requests, forget_requests
        self.follow = follow
        self.next_seq = 0  # the number of the next training request (request order)
        self.members: list[Member] = []
        self.next_index = 0
        self.retry: list[dict] = []  # prompts of requests that died: issued again before new ones
        self.counts = {"fleet/added": 0, "fleet/removed": 0, "faults/generator_restarts": 0,
                       "faults/lost_groups": 0, "sync/loads": 0, "sync/skipped_versions": 0,
                       "gen/following_requests": 0}
        # admission's count of live groups: requests add to it, drops and losses take from it, and the replay
        # actor's stats in each generator's ack take out its drops (the driver sets it once the replay is restored)
        self.live = LiveGroups()
        self.requests = 0  # generate() calls made
        self.requests_by_generator: dict[int, int] = {}
        self.lost_evaluations: list[int] = []  # steps whose evaluation died with its generator: to run again
        self.node_queries = 0  # ray.nodes() calls: the driver's round trips to the GCS

    # -- size --------------------------------------------------------------------------------------------------

    def active(self) -> list[Member]:
        return [m for m in self.members if m.state == ACTIVE]

    def busy(self) -> bool:
        """Something may still deliver groups or become able to: a request in flight, an actor (re)starting."""
        return any(m.requests or m.state in (STARTING, RESTARTING) for m in self.members)

    def start(self, minimum: int) -> None:
        """Ask for ``target`` members and wait until ``minimum`` of them are active (engines loaded)."""
        self.reconcile()
        deadline_refs = None
        while len(self.active()) < minimum:
            refs = self.refs()
            if not refs:
                break
            ready = wait_any(refs, self.timeout_s)  # raises RunStopped soon after a stop request
            if not ready:
                deadline_refs = refs
                break
            self.on_ready(set(ready))
        if len(self.active()) < minimum:
            waiting = sum(m.state == PLACING for m in self.members)
            raise ClusterError(
                f"only {len(self.active())} of the {minimum} generation actors needed to start are running after "
                f"{self.timeout_s:g} s ({waiting} still waiting for {self.bundle} each); the cluster's free "
                f"resources are {ray.available_resources()}. Lower cluster.num_generators (its min) or add nodes"
                if deadline_refs is not None else
                f"the generation actors failed to start ({self.counts['fleet/removed']} removed); see the "
                "generator logs")

    def scale(self, target: int) -> None:
        """Set the number of generators the pool keeps (``rlfleet scale``); takes effect in :meth:`reconcile`."""
        self.target = max(0, int(target))

    def reconcile(self, check_nodes: bool = False) -> None:
        """Bring the pool to ``target``: remove members whose node is gone (those Ray is restarting always; every
        member with ``check_nodes``), place new ones, or cancel / stop / drain the newest."""
        if check_nodes or any(m.state == RESTARTING for m in self.members):
            alive = {n["NodeID"] for n in self._nodes()}
            for m in [m for m in self.members if m.node_id is not None and m.node_id not in alive
                      and (check_nodes or m.state == RESTARTING)]:
                if self.colocated:
                    raise ActorLost(f"the node {m.node_id[:12]} of the colocated learner and engine is gone")
                self._remove(m, f"its node {m.node_id[:12]} is gone")
        kept = [m for m in self.members if not m.draining]
        for _ in range(self.target - len(kept)):
            m = Member(self.next_index, self.place(self.bundle, f"rlfleet-generator-{self.next_index}"))
            m.waiting = m.placement.ready()
            self.next_index += 1
            self.members.append(m)
        excess = len(kept) - self.target
        order = {PLACING: 0, STARTING: 1, RESTARTING: 2, ACTIVE: 3}  # cheapest to give up first, newest first
        for m in sorted(kept, key=lambda m: (order[m.state], bool(m.requests), -m.index))[:max(excess, 0)]:
            if not m.requests:
                self._remove(m, "scaled down")
            else:
                m.draining = True  # its requests finish first; removed in on_ready

    # -- events ------------------------------------------------------------------------------------------------

    def refs(self) -> list[ray.ObjectRef]:
        """Everything the driver should wait on for this pool."""
        return [r for m in self.members for r in (m.waiting, *(q.future for q in m.requests)) if r is not None]

    def on_ready(self, ready: set[ray.ObjectRef]) -> list[tuple[int, dict]]:
        """Handle every ref of :meth:`refs` in ``ready``; returns ``(index, stats)`` of each finished request."""
        finished, keys = [], []
        for m in list(self.members):
            if m.waiting is not None and m.waiting in ready:
                self._waited(m)
            for request in [q for q in m.requests if q.future in ready]:  # in the order the actor ran them
                if request not in m.requests:  # the actor died: a failed earlier request took the rest with it
                    continue
                if request.key is None:
                    finished.extend((m.index, stats) for stats in self._collect(m, request))
                    continue
                part, ended = self._collect_stream(m, request)
                finished.extend((m.index, stats) for stats in part)
                if ended:
                    keys.append(request.key)
        if keys and self.forget_requests is not None:
            self.forget_requests(keys)
        return finished

    def _waited(self, m: Member) -> None:
        ref, m.waiting = m.waiting, None
        if m.state == PLACING:  # its bundle is placed: start the actor there
            m.handle, m.state = self.start_actor(m.index, m.placement.options()), STARTING
            m.waiting = m.handle.ready.remote()
            return
        try:
            m.node_id = ray.get(ref, timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as err:
            self._raise_if_colocated(m, err)
            if m.state == RESTARTING:
                self.target = max(0, self.target - 1)  # restarts used up: not replaced
                self._remove(m, f"it died more than cluster.max_restarts times ({type(err).__name__})")
            else:
                self._remove(m, f"its engine failed to start ({type(err).__name__}: {err})")
            return
        if m.state == STARTING:
            self.counts["fleet/added"] += 1
            console(f"{m.name} joined the fleet ({len(self.active()) + 1} running)")
        m.state, m.version = ACTIVE, -1  # current weights go out before its next request

    def _collect(self, m: Member, request: Request) -> list[dict]:
        """A generate() finished: its stats, or none if the actor died (the prompts of its requests are
        re-issued)."""
        try:
            stats = ray.get(request.future, timeout=self.timeout_s)
            if request.sync_future is not None:
                stats["sync/seconds"] = ray.get(request.sync_future, timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as err:
            self._failed(m, err)
            return []
        self._heard(m, request, stats)
        self._done(m, request)
        return [stats]

    def _collect_stream(self, m: Member, request: Request) -> tuple[list[dict], bool]:
        """A stream() has news: one handing-on of groups (its stats, in a list), or its end; ``(parts, ended)``,
        ``ended`` when the replay actor may forget the request. If the actor died, neither: the prompts it had not
        handed on are re-issued, and the replay actor keeps the request fenced."""
        try:
            ref = next(request.future)  # ready: the next handing-on, the end, or the actor's failure
        except StopIteration:
            self._done(m, request)
            return [], True
        try:
            prompts, stats = ray.get(ref, timeout=self.timeout_s)
            if request.sync_future is not None:  # the load before it, reported with its first groups
                stats["sync/seconds"] = ray.get(request.sync_future, timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as err:
            self._failed(m, err)
            return [], False
        request.sync_future = None
        self.handed_on(m, request, prompts, stats)
        return [stats], False

    def handed_on(self, m: Member, request: Request, prompts: list[str], stats: dict) -> None:
        """``request``'s groups of ``prompts`` were handed on (or dropped): they leave it, so :meth:`generating` and
        the member's room count them no more, and a loss of the member re-issues only the others."""
        request.records = without_prompts(request.records, Counter(prompts))
        request.heard.update(prompts)
        self._heard(m, request, stats)

    def _done(self, m: Member, request: Request) -> None:
        """``request`` returned: it leaves ``m``, and a member leaving the fleet goes once it has none."""
        m.requests.remove(request)
        if m.draining and not m.requests:
            self._remove(m, "scaled down")

    def _heard(self, m: Member, request: Request, stats: dict) -> None:
        """A request's stats arrived: its drops leave the live count, the replay actor's ack is heard, and the
        member's weights version follows what it sampled with."""
        self.live.gone(int(stats.get("gen/dropped_groups", 0)))
        if "replay/seq" in stats:  # the replay actor's ack of its groups
            self.live.heard(stats)
        held = stats.get("policy_version", request.version)
        if held < request.version:  # restarted while idle: initial weights again
            self.counts["faults/generator_restarts"] += 1
            m.version, m.incarnation = -1, m.incarnation + 1
        elif held > m.version:  # a broadcast round newer than its request's arrived first and was loaded
            m.version = int(held)

    def _failed(self, m: Member, err: Exception) -> None:
        """``m``'s call failed with its actor: its requests are lost (their prompts re-issued), and it is restarted
        by Ray or, if its node is gone or it was leaving, removed."""
        self._raise_if_colocated(m, err)
        self._lose_requests(m)
        if m.draining or not self._node_alive(m.node_id):
            self._remove(m, "its node is gone" if not m.draining else "it died while draining")
        else:  # Ray restarts it (cluster.max_restarts); ready() is retried until the new actor answers
            self.counts["faults/generator_restarts"] += 1
            m.state, m.version, m.incarnation = RESTARTING, -1, m.incarnation + 1
            m.waiting = m.handle.ready.options(max_task_retries=-1).remote()
            why = (f"was killed by Ray's memory monitor: {OUT_OF_MEMORY}"
                   if isinstance(err, ray.exceptions.OutOfMemoryError) else f"died ({type(err).__name__})")
            warn(f"{m.name} {why}; its prompts are re-issued")

    def _raise_if_colocated(self, m: Member, err: Exception) -> None:
        if self.colocated:
            raise ActorLost(f"the colocated learner and engine ({m.name}) died: {type(err).__name__}: {err}") from err

    def _remove(self, m: Member, why: str) -> None:
        self._lose_requests(m)  # requests that will never be collected
        if m.handle is not None:
            try:
                ray.kill(m.handle, no_restart=True)
            except Exception:  # already gone
                pass
        m.placement.release()
        self.members.remove(m)
        if m.state != PLACING:
            self.counts["fleet/removed"] += 1
            say = console if why == "scaled down" else warn  # asked for, or an event to look into
            say(f"{m.name} left the fleet: {why} ({len(self.active())} running)")

    def _lose_requests(self, m: Member) -> None:
        """``m``'s requests will never return: their prompts are re-issued (those the replay actor does not have,
        for requests that hand groups on as made), their evaluations run again, and in request order the replay
        actor stops waiting for them."""
        keys = [request.key for request in m.requests if request.key is not None]
        delivered = self.fence_requests(keys) if keys and self.fence_requests is not None else {}
        for request in m.requests:
            arrived = Counter(delivered.get(request.key, ())) - request.heard  # arrived, not yet heard of
            lost = without_prompts(request.records, arrived)  # the arrived are in the replay actor: live, not lost
            self.counts["faults/lost_groups"] += len(lost)
            self.live.gone(len(lost))
            self.retry.extend(lost)
            if request.evaluating is not None:
                self.lost_evaluations.append(request.evaluating)
        lost = [request.seq for request in m.requests if request.seq is not None]
        if lost and self.skip_requests is not None:
            self.skip_requests(lost)
        m.requests = []

    def _nodes(self) -> list[dict]:
        self.node_queries += 1
        return [n for n in ray.nodes() if n.get("Alive")]

    def _node_alive(self, node_id: str | None) -> bool:
        return any(n["NodeID"] == node_id for n in self._nodes())

    # -- requests ----------------------------------------------------------------------------------------------

    def weight_group(self) -> list[str]:
        """The keys of the active members: the group a transport with a membership publishes to."""
        return [m.key for m in self.active()]

    def oldest_in_flight(self, overtaking: Member | None = None, follows: bool = False) -> int | None:
        """The lowest weights version a training request in flight samples with (None when none is). For a request
        about to be queued on ``overtaking``: only the requests it could overtake, those of the other members (a
        member runs its requests in order; see :mod:`rlfleet.cluster.admission`). A continuous engine's requests
        finish in any order, so its own count too, unless the new request ``follows`` them (hands on after them:
        :mod:`rlfleet.generation.own_order`). In request order nothing is overtaken: None."""
        if self.skip_requests is not None:
            return None
        if self.stream is not None and not follows:
            overtaking = None
        return min((q.version for m in self.members if m is not overtaking for q in m.requests
                    if q.evaluating is None and q.records), default=None)

    def _may_follow(self, m: Member) -> bool:
        """A request on ``m`` may follow its own: a continuous engine streaming groups in arrival order, ``follow``
        set, and a training request of ``m``'s generating (else following is starting at once)."""
        return (self.follow and self.stream is not None and self.skip_requests is None
                and any(q.evaluating is None and q.records for q in m.requests))

    def generating(self) -> int:
        """Groups of training requests still in flight on the members (requested, not yet returned or handed on)."""
        return sum(len(q.records) for m in self.members for q in m.requests if q.evaluating is None)

    def lost(self) -> int:
        return self.counts["faults/lost_groups"]

    def _room(self, m: Member) -> int:
        """Requests (continuous engines: groups, an evaluation counting one) ``m`` may take now."""
        if self.stream is None:
            return self.depth - len(m.requests)
        return self.depth - sum(len(q.records) if q.evaluating is None else 1 for q in m.requests)

    def _open(self, weights: WeightHandle) -> list[Member]:
        """The members a request may be queued on, in order of preference: those with room (:meth:`_room`), in the
        weight-transfer group of ``weights`` (a member joins it at the next publication), not leaving; the emptiest
        first, then the least recently served."""
        open_ = [m for m in self.active() if self._room(m) > 0 and not m.draining and weights.reaches(m.key)]
        return sorted(open_, key=lambda m: (-self._room(m), m.last_request))

    def _serve(self, m: Member, weights: WeightHandle | None, count: bool = True) -> ray.ObjectRef | None:
        """Count a request for ``m``; with ``weights``, queue their load first (an actor's methods execute in order)
        and return it. Versions published since the member's last load that it never loads count as skipped.
        A load queued behind a request still generating has its bytes fetched at once, beside that generation (the
        object store's transfer, where the member is on another node than the learner)."""
        if count:
            self.requests += 1
            m.last_request = self.requests
            self.requests_by_generator[m.index] = self.requests_by_generator.get(m.index, 0) + 1
        if weights is None or m.version == weights.version:
            return None
        if 0 <= m.version < weights.version:
            self.counts["sync/skipped_versions"] += weights.version - m.version - 1
        self.counts["sync/loads"] += 1
        m.version = weights.version
        if m.requests:
            m.handle.fetch_weights.remote(weights)  # its completion is the load's to wait for: nothing to collect
        return m.handle.update_weights.remote(weights)

    def _load_in_flight(self, weights: WeightHandle) -> None:
        """Continuous engines: queue the load of ``weights`` on every member generating with older ones; it lands
        between two engine steps, their completions in flight continuing under the new weights (the actor reports
        the load's seconds with its next results)."""
        for m in self.active():
            if m.requests and not m.draining and m.version < weights.version and weights.reaches(m.key):
                self._serve(m, weights, count=False)

    def dispatch_evaluation(self, step: int, weights: WeightHandle, records, n: int, temperature: float | None
                            ) -> bool:
        """Start the evaluation of learner step ``step`` (``weights``: that step's) on the least recently served idle
        member; False when none is idle. ``records``: the held-out prompts (an object ref, put once)."""
        open_ = self._open(weights)
        if not open_:
            return False
        m = open_[0]
        sync = self._serve(m, weights)
        future = m.handle.evaluate.remote(records, n, temperature, step)
        m.requests.append(Request(future, [], weights.version, sync, evaluating=step))
        return True

    def dispatch(self, weights: WeightHandle, budget_at: Callable[[int, int | None, int], int],
                 take: Callable[[int], list[dict]]) -> int:
        """Queue requests on the members' free slots while the staleness bound admits them; re-issued prompts go
        first. ``budget_at(version, oldest_in_flight, launched)``: the groups the bound admits now, sampled at
        ``version``, after ``launched`` more were requested in this call (the driver's admission);
        ``oldest_in_flight`` is that of the other members' requests, which alone can overtake the new one. Each request
        samples with the weights :func:`~rlfleet.cluster.admission.plan_request` picks: the member's own when the
        bound admits a full request with them and the transport can serve a version lazily (object store), else
        ``weights`` (loaded first). Returns the number of prompts requested."""
        launched = 0
        lazy = weights.capabilities.lazy  # else every member received the publication: it loads it
        if self.stream is not None:
            self._load_in_flight(weights)

        def admitted() -> tuple[Member, int, int, bool] | None:
            """The first open member the bound admits a request on, its version, size, and whether it follows the
            member's own requests. Not always the first open one: an empty member is held back by another's slow
            request, which the member generating it is not (nothing overtakes a member's own queue). A continuous
            member's request follows its own (:mod:`rlfleet.generation.own_order`) only where the bound admits
            nothing that starts at once: it waits for them to end."""
            for m in self._open(weights):
                size = self.prompts_per_request if self.stream is None else min(self.prompts_per_request,
                                                                                self._room(m))
                for follows in (False, True) if self._may_follow(m) else (False,):
                    version, n = plan_request(m.version if lazy else -1, weights.version, size,
                                              lambda v: budget_at(v, self.oldest_in_flight(m, follows), launched))
                    if n > 0:
                        return m, version, n, follows
            return None

        while (choice := admitted()) is not None:
            m, version, n, follows = choice
            sync = self._serve(m, weights if version == weights.version else None)
            records, self.retry = self.retry[:n], self.retry[n:]
            records += take(n - len(records))
            seq = key = ordinal = None
            if self.skip_requests is not None:
                seq, self.next_seq = self.next_seq, self.next_seq + 1
            if self.stream is None:
                future = m.handle.generate.remote(records, seq)
            elif seq is None:  # beside the member's other requests (or following them), no token older than
                key = f"{m.key}#{self.requests}"  # ``version``, each group handed on as made
                ordinal, m.streamed = m.streamed, m.streamed + 1
                low = min([q.ordinal for q in m.requests if q.ordinal is not None], default=ordinal)
                self.counts["gen/following_requests"] += follows
                future = m.handle.stream.options(concurrency_group=self.stream).remote(records, version, key,
                                                                                       ordinal, low, follows)
            else:  # in request order the replay actor takes a request's groups at once
                future = m.handle.generate.options(concurrency_group=self.stream).remote(records, seq, version)
            m.requests.append(Request(future, records, version, sync, seq=seq, key=key, ordinal=ordinal,
                                      follows=follows))
            launched += n
        self.live.requested(launched)
        return launched

    def quiesce(self) -> list[tuple[int, dict]]:
        """Wait for every request in flight (before a checkpoint); returns their stats as :meth:`on_ready`."""
        finished = []
        while refs := [q.future for m in self.members for q in m.requests]:  # a stream's ref is ready per part
            ready = wait_any(refs, self.timeout_s)
            if not ready:
                raise ClusterError(f"the generation requests in flight did not finish within cluster.timeout_s="
                                   f"{self.timeout_s:g} s")
            finished += self.on_ready(set(ready))
        return finished

    def shutdown(self) -> None:
        for m in list(self.members):
            if m.handle is not None:
                try:
                    ray.kill(m.handle, no_restart=True)
                except Exception:
                    pass
            m.placement.release()
        self.members = []
