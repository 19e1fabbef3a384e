"""Evaluation while training (``logging.eval_steps``): which learner steps are due and which generator runs them."""

from __future__ import annotations

from rlfleet.cluster.pool import GeneratorPool
from rlfleet.config import RLFleetConfig


class Evaluations:
    """Evaluation while training (``logging.eval_steps``): which learner steps are due, with the weights each
    evaluates, queued until a generator is idle; which ran.

    Step 0 (the initial weights, a baseline) is due when a run starts from scratch. After step s with
    ``s % eval_steps == 0`` or ``s == max_steps``, step s is queued with its weights handle. With a ``lazy`` transport
    (the object store) the handle keeps its weights loadable, so the evaluation loads exactly step s's weights even if
    later steps were published meanwhile; otherwise (a broadcast round is received once) a queued evaluation takes
    the latest weights when it starts, and its record names their step (so does every evaluation on continuous
    engines, which load each publication in flight and never go back to older weights). An evaluation whose generator
    died is queued again.

    ``prompts`` names what is evaluated, for the console: 'held-out prompts', or 'training prompts' with
    ``data.eval_on_train`` (the preflight refuses that flag where the evaluation split shares no training row, and
    evaluation on shared rows without it)."""

    def __init__(self, cfg: RLFleetConfig, dataset):
        self.every, self.max_steps = cfg.logging.eval_steps, cfg.learner.max_steps
        self.n = cfg.logging.eval_num_generations
        self.temperature = 0.0 if cfg.logging.eval_greedy else None
        self.prompts = "training prompts" if cfg.data.eval_on_train else "held-out prompts"
        self.records = None
        if dataset is not None and self.every is not None:
            import ray

            self.records = ray.put([{**row, "prompt_id": f"eval-{i}"} for i, row in enumerate(dataset)])
        self.queue: list[tuple[int, object]] = []  # (step, its weights handle), oldest first
        self.handles: dict[int, object] = {}  # the handle of every step queued or running
        self.latest = None  # the latest weights handle
        self.steps_done: list[int] = []

    def after_step(self, step: int, weights) -> None:
        self.latest = weights
        if self.records is not None and (step % self.every == 0 or step == self.max_steps):
            self.queue.append((step, weights))
            self.handles[step] = weights

    def dispatch(self, pool: GeneratorPool) -> None:
        while self.queue:
            step, weights = self.queue[0]
            # a continuous engine loads every publication in flight: it never goes back to an older one
            if (not weights.capabilities.lazy or pool.stream is not None) and self.latest is not None:
                step, weights = self.latest.version, self.latest  # see the class doc
            if not pool.dispatch_evaluation(step, weights, self.records, self.n, self.temperature):
                return
            self.queue.pop(0)
            self.handles[step] = weights

    def requeue(self, pool: GeneratorPool) -> None:
        """Evaluations lost with their generator go to the front of the queue."""
        while pool.lost_evaluations:
            step = pool.lost_evaluations.pop()
            self.queue.insert(0, (step, self.handles[step]))

    def done(self, record: dict) -> None:
        self.handles.pop(int(record["step"]), None)
        self.steps_done.append(int(record["step"]))

    def outstanding(self, pool: GeneratorPool) -> bool:
        return bool(self.queue) or any(m.evaluating for m in pool.members)
