"""One learner for every objective: the micro-batch loop, the step's counters and the checkpoint.

A :class:`Learner` is a :class:`~rlfleet.learner.trainee.Trainee` (what is trained) and an :class:`Objective` (what
it is trained for: the policy gradient of :mod:`rlfleet.learner.policy`, DPO with BEMA of :mod:`rlfleet.dpo.learner`,
online DPO of :mod:`rlfleet.dpo.online`). One ``train_step(items)``:

1. ``objective.plan(items, version)`` cuts the items (groups, or preference pairs) into this rank's micro-batches
   (fillers included, :func:`~rlfleet.learner.distributed.micro_batches`) and says how many passes to make over
   them; a plan without micro-batches makes no update (online DPO's step without a pair);
2. each pass: ``objective.loss(plan, micro)`` per micro-batch, backward (a filler's loss times 0, so every rank
   runs the same collectives), then the trainee's clipped optimizer step; then one lr-scheduler step;
3. ``objective.after_step(step)`` (BEMA), and ``objective.report`` turns every rank's records into the metrics.

``policy_version`` counts ``train_step`` calls (weight publications: the staleness bound is in these units); ``step``
counts the steps that updated the weights (TRL's ``global_step``, BEMA's clock). They differ only for online DPO.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from rlfleet.learner import distributed as dist_
from rlfleet.learner.trainee import Trainee, locate
from rlfleet.transport.packed import PackedWeights, WeightPacker, unpack


@dataclass
class Micro:
    """One micro-batch of this rank: its collated rows, ``real`` (False: a filler whose loss counts 0) and what the
    objective computed for it before the passes (reference or proximal log-probs, importance weights)."""

    batch: Any
    real: bool
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """One step's work on this rank: its micro-batches, the passes over them, and the objective's context."""

    micro: list[Micro]
    passes: int = 1
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class Loss:
    """One micro-batch's loss (already divided by the step's normaliser), its metrics, the weight of those metrics
    in the step's mean (tokens, or pairs) and its trained tokens."""

    loss: Tensor
    metrics: dict[str, float]
    weight: float
    tokens: float


class Objective(Protocol):
    """What a learner is trained for (see the module doc). ``state()`` and ``load_state`` carry its counters in
    ``learner.json``; ``save`` / ``load`` its own files (BEMA's) beside the learner's."""

    def plan(self, items: list, version: int) -> Plan: ...

    def loss(self, plan: Plan, micro: Micro) -> Loss: ...

    def after_step(self, step: int) -> dict[str, float]: ...

    def report(self, plan: Plan, records: list[tuple[dict[str, float], float]] | None,
               common: dict[str, float]) -> dict[str, float]: ...

    def state(self) -> dict: ...

    def load_state(self, state: dict) -> None: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class Learner:
    """A trainee trained for an objective (see the module doc)."""

    def __init__(self, trainee: Trainee, objective: Objective):
        self.trainee, self.objective, self.rank = trainee, objective, trainee.rank
        self.policy_version = 0  # train_step calls: publications
        self.step = 0  # optimizer updates (a step whose plan has no micro-batch makes none)
        self.packer = WeightPacker(trainee.compute_dtype)

    def __getattr__(self, name: str):
        """The trainee's parts (``model``, ``optimizer`` ...) and then the objective's (``bema`` ...) read as the
        learner's own."""
        for part in (self.__dict__.get("trainee"), self.__dict__.get("objective")):
            if part is not None and hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def train_step(self, items: list) -> dict[str, float]:
        """One step on ``items`` (groups or preference pairs); the objective's metrics, with ``loss`` and
        ``grad_norm`` (before clipping; both means over the passes), ``lr``, ``learner/tokens`` (trained tokens) and
        ``time/step_s``."""
        start = time.perf_counter()
        trainee = self.trainee
        plan = self.objective.plan(items, self.policy_version)
        common = {"lr": trainee.optimizer.param_groups[0]["lr"]}
        records = None
        if plan.micro:
            records, total_loss, tokens, grad_norms = [], 0.0, 0.0, []
            for n in range(plan.passes):
                for micro in plan.micro:
                    result = self.objective.loss(plan, micro)
                    (result.loss if micro.real else result.loss * 0.0).backward()
                    if micro.real:
                        total_loss += result.loss.item()
                        tokens += result.tokens if n == 0 else 0.0
                        records.append((result.metrics, result.weight))
                grad_norms.append(trainee.optimizer_step())
            trainee.scheduler.step()
            self.step += 1
            parts = dist_.gather_objects((records, total_loss, tokens), self.rank)  # every rank's, in rank order
            records = [r for part, _, _ in parts for r in part]
            common |= {"loss": sum(p[1] for p in parts) / plan.passes, "grad_norm": sum(grad_norms) / plan.passes,
                       "learner/tokens": sum(p[2] for p in parts)}
            common |= self.objective.after_step(self.step)
        self.policy_version += 1
        metrics = self.objective.report(plan, records, common)
        metrics["time/step_s"] = time.perf_counter() - start
        return metrics

    # -- weights and checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """What the engines load (a collective in a learner group)."""
        return self.trainee.engine_state()

    def state_stream(self):
        """:meth:`state_dict` for an engine in the learner's process (``cluster.colocate``): a group's full weights
        gathered one tensor at a time as the engine reads them (a collective)."""
        return self.trainee.engine_state_stream()

    def packed_weights(self) -> PackedWeights:
        """:meth:`state_dict` in the compute dtype, packed into the learner's reusable host buffer under Hugging Face
        names (tied ``lm_head.weight`` shares the embedding's bytes). Valid until the next call."""
        return self.packer.pack(self.state_dict())

    def weights(self) -> dict[str, Tensor]:
        """A snapshot of :meth:`packed_weights` as CPU tensors (loads into a fresh HF model with ``strict=True``)."""
        packed = self.packed_weights()
        return unpack(PackedWeights(packed.buffer.copy(), packed.slots))

    def save(self, step_dir: str | Path) -> None:
        """Checkpoint ``step_dir/policy/`` and ``step_dir/learner/`` (:mod:`rlfleet.learner.trainee`'s layout); every
        rank of a group calls it with the same directory."""
        d = Path(step_dir)
        (d / "policy").mkdir(parents=True, exist_ok=True)
        (d / "learner").mkdir(parents=True, exist_ok=True)
        self.trainee.save_policy(d / "policy")
        self.trainee.save_state(d / "learner")
        self.objective.save(d / "learner")
        if self.rank.leader:
            state = {"policy_version": self.policy_version, "step": self.step, **self.objective.state()}
            (d / "learner" / "learner.json").write_text(json.dumps(state))

    def load(self, step_dir: str | Path) -> None:
        """Restore a checkpoint :meth:`save` wrote, or one of the layouts before it
        (:func:`~rlfleet.learner.trainee.locate`), exactly and without unpickling, with a learner group of the size
        that wrote it."""
        layout = locate(step_dir)
        self.trainee.load(layout)
        self.objective.load(layout.state)
        state = layout.counters()
        self.policy_version, self.step = int(state["policy_version"]), int(state["step"])
        self.objective.load_state(state)

    def save_merged(self, directory: str | Path) -> None:
        """Base + LoRA adapter merged, Hugging Face format (``model.lora.save_merged``)."""
        self.trainee.save_merged(directory)

    def evaluate(self, items: list) -> dict[str, float]:
        """The objective's held-out metrics on ``items`` (DPO's), no parameter changes."""
        return self.objective.evaluate(items)

    def save_bema(self, directory: str | Path) -> None:
        """The objective's BEMA weights in Hugging Face format (DPO and online DPO with ``dpo.bema``)."""
        self.objective.save_bema(Path(directory))


class NoState:
    """An objective without counters or files of its own."""

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def save(self, directory: Path) -> None:
        pass

    def load(self, directory: Path) -> None:
        pass
