"""The DPO objective: sigmoid DPO on preference pairs, with BEMA updates of the reference model.

:class:`DPO` plugs into :class:`~rlfleet.learner.core.Learner` (the micro-batch loop, the optimizer step, the
checkpoint) on a :class:`~rlfleet.learner.trainee.Trainee` whose reference is a frozen copy of the policy; plain
classes, no Ray: :class:`~rlfleet.learner.actor.LearnerActor` wraps the learner, and tests run it in-process.

One ``train_step(pairs)`` (Rafailov et al., arXiv 2305.18290; TRL's ``DPOTrainer`` with ``loss_type="sigmoid"``):

1. **Collate** micro-batches of pairs (:func:`collate_pairs`): each pair gives two rows, prompt + chosen and prompt
   + rejected, chosen rows first (TRL's ``[chosen; rejected]`` layout); prompts left-padded, completions
   right-padded, rows longer than ``dpo.max_length`` cut at the end (TRL's ``keep_start``).
2. **Sequence log-probabilities** ``logp = sum_t m_t log pi(y_t | x, y_<t)`` over the completion tokens only (the
   prompt is masked out, no length normalisation), under the policy and, without gradient, the reference model.
3. **Loss** ``sum_i -log sigmoid(beta * Delta_i) / B`` with ``Delta_i = (logp_c - ref_c) - (logp_r - ref_r)``
   (:func:`~rlfleet.learner.losses.dpo_loss`); every micro-batch is divided by the same normaliser ``B`` = pairs
   in the step, so the gradient does not depend on micro-batching. Backward per micro-batch, gradient clipping,
   one AdamW step, one lr-scheduler step.
4. **BEMA** (when ``dpo.bema`` is set; Block & Zhang, arXiv 2508.00180, TRL's ``BEMACallback`` with
   ``update_ref_model=True``): with the absolute optimizer step ``t`` (1 after the first step, TRL's
   ``global_step``), ``BEMA.step(t, trainable parameters)``, then, when ``ref_update_due(t)``, the BEMA weights are
   copied into the reference model. The BEMA buffers are float32 and live on the CPU (TRL's default ``device``);
   only trainable parameters are tracked, so frozen ones keep their value in the reference; the BEMA weights are
   never written into the policy (TRL does when there is no reference model).

With ``model.lora`` the policy is the base model plus a peft adapter, the only trained parameters; the reference is
the policy with its adapter disabled (the base model, no second copy of the weights), or with BEMA a frozen copy
whose adapter BEMA refreshes (BEMA tracks the adapter's parameters only).

Parameters are float32 master weights; when ``model.dtype`` resolves to bfloat16/float16 the forward passes run
under autocast and the reference model is kept in that dtype (:mod:`rlfleet.learner.trainee`).
The step draws no random number (dropout off, no shuffling), so it is deterministic and ``seed`` is only recorded.

Checkpoints (:meth:`~rlfleet.learner.core.Learner.save`) are read back without unpickling: the policy in Hugging Face
format, and safetensors + JSON for the optimizer, the scheduler, the reference model and the BEMA state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlfleet import lora as lora_
from rlfleet.config import DPOConfig, LearnerConfig, ModelConfig, RLFleetConfig
from rlfleet.dpo.bema import BEMA
from rlfleet.dpo.data import PreferencePair
from rlfleet.learner import distributed as dist_
from rlfleet.learner.core import Learner, Loss, Micro, Plan
from rlfleet.learner.distributed import SINGLE, Rank, micro_batches
from rlfleet.learner.logprobs import completion_logprobs
from rlfleet.learner.losses import dpo_loss
from rlfleet.learner.trainee import Trainee

# ----------------------------------------------------------------------------------------------------------------
# Collation and sequence log-probabilities
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """``B`` pairs as ``2B`` rows: chosen completions in rows ``0..B-1``, rejected in ``B..2B-1``."""

    input_ids: Tensor  # [2B, P+T] long  prompt left-padded to P, completion right-padded to T
    attention_mask: Tensor  # [2B, P+T] long  1 on real tokens
    position_ids: Tensor  # [2B, P+T] long  0-based index among the row's real tokens
    completion_ids: Tensor  # [2B, T] long
    mask: Tensor  # [2B, T] float  1 on scored completion tokens

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate_pairs(pairs: list[PreferencePair], pad_id: int, max_length: int) -> PairBatch:
    """Pad ``pairs`` into one :class:`PairBatch`.

    Row ``(p, c)`` is cut to ``len(p) + len(c) <= max_length`` by shortening ``c`` (the prompt is shorter than
    ``max_length``: ``tokenize_preferences`` drops the others), then laid out as
    ``[pad] * (P - len(p)) + p + c + [pad] * (T - len(c))`` with ``mask = 1`` on the ``len(c)`` completion columns.
    An empty prompt leaves the first completion token without context: it becomes the context and is not scored
    (TRL's shifted labels do the same).
    """
    if not pairs:
        raise ValueError("collate_pairs: got no pairs; a DPO step needs at least one preference pair")
    rows = []  # (context, completion)
    for completions in ([p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]):
        for pair, completion in zip(pairs, completions):
            prompt = list(pair.prompt_token_ids)
            if len(prompt) >= max_length:
                raise ValueError(f"collate_pairs: a prompt has {len(prompt)} >= dpo.max_length={max_length} tokens")
            completion = list(completion)[: max_length - len(prompt)]
            if not prompt:
                prompt, completion = completion[:1], completion[1:]
            rows.append((prompt, completion))
    P = max(len(p) for p, _ in rows)
    T = max(max(len(c) for _, c in rows), 1)
    input_ids = torch.full((len(rows), P + T), pad_id, dtype=torch.long)  # [2B, P+T]
    attention_mask = torch.zeros((len(rows), P + T), dtype=torch.long)  # [2B, P+T]
    completion_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [2B, T]
    mask = torch.zeros((len(rows), T))  # [2B, T]
    for i, (prompt, completion) in enumerate(rows):
        n = len(completion)
        input_ids[i, P - len(prompt) : P + n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, P - len(prompt) : P + n] = 1
        completion_ids[i, :n] = torch.tensor(completion, dtype=torch.long)
        mask[i, :n] = 1.0
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),  # [2B, P+T]
        completion_ids=completion_ids,
        mask=mask,
    )


def sequence_logprobs(model: torch.nn.Module, batch: PairBatch, chunk_tokens: int = 0, pack: bool = False) -> Tensor:
    """``sum_t mask * log softmax(logits)`` at each row's completion tokens, float32, ``[2B]`` (``chunk_tokens``,
    ``pack``: see :func:`~rlfleet.learner.logprobs.completion_logprobs`)."""
    return (completion_logprobs(model, batch, 1.0, chunk_tokens, pack) * batch.mask).sum(-1)  # [2B]


def mean_by_pairs(records: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Pair-weighted mean of per-micro-batch means: ``sum(v * b) / sum(b)``."""
    total = sum(b for _, b in records)
    return {key: sum(m[key] * b for m, b in records) / total for key in records[0][0]}


# ----------------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------------


class DPO:
    """Sigmoid DPO on preference pairs with optional BEMA (see the module doc). ``step`` counts optimizer steps
    (TRL's global_step, BEMA's clock). ``learner.micro_batch_size`` counts sequences, so a micro-batch holds
    ``max(1, micro_batch_size // 2)`` pairs."""

    def __init__(self, trainee: Trainee, dpo_cfg: DPOConfig):
        self.trainee, self.cfg = trainee, dpo_cfg
        self.bema = BEMA(trainee.trainable(), dpo_cfg.bema, device="cpu") if dpo_cfg.bema is not None else None
        self.pairs_per_micro_batch = max(1, trainee.cfg.micro_batch_size // 2)
        self.step = 0

    def _micro(self, pairs: list[PreferencePair]) -> list[Micro]:
        """This rank's micro-batches (fillers included, :func:`~rlfleet.learner.distributed.micro_batches`)."""
        if not pairs:
            collate_pairs(pairs, 0, self.cfg.max_length)  # raises, naming the empty step
        pad, device = self.trainee.tokenizer.pad_token_id, self.trainee.device
        return [Micro(collate_pairs(pairs[m.start:m.stop], pad, self.cfg.max_length).to(device), m.real)
                for m in micro_batches(len(pairs), self.pairs_per_micro_batch, self.trainee.rank)]

    def logps(self, model: torch.nn.Module, batch: PairBatch) -> Tensor:
        """[2B] sequence log-probs (under autocast when the compute dtype is not float32)."""
        return (self.trainee.logprobs(model, batch, 1.0) * batch.mask).sum(-1)

    def _loss(self, batch: PairBatch, normalizer: float) -> tuple[Tensor, dict[str, float]]:
        """DPO loss of one micro-batch (``/ normalizer``) and its metrics (means over the micro-batch)."""
        b = batch.num_pairs
        with self.trainee.as_reference() as reference:
            ref = self.logps(reference, batch)  # [2b]
        logps = self.logps(self.trainee.model, batch)  # [2b]
        result = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], self.cfg.beta, normalizer=normalizer)
        chosen, rejected = logps[:b].detach(), logps[b:].detach()
        result.metrics.update({
            "logps/chosen": float(chosen.mean()),
            "logps/rejected": float(rejected.mean()),
            "policy_accuracy": float((chosen > rejected).float().mean()),
        })
        return result.loss, result.metrics

    def plan(self, pairs: list[PreferencePair], version: int) -> Plan:
        return Plan(self._micro(pairs), context={"pairs": pairs})

    def loss(self, plan: Plan, micro: Micro) -> Loss:
        loss, metrics = self._loss(micro.batch, normalizer=float(len(plan.context["pairs"])))
        return Loss(loss, metrics, micro.batch.num_pairs, micro.batch.mask.sum().item())

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float]:
        """BEMA at absolute step t = ``step``; its weights into the reference when due."""
        self.step = step
        if self.bema is None:
            return {}
        updated = self.bema.step(step, self.trainee.trainable())
        ref_updated = self.bema.ref_update_due(step)
        if ref_updated:
            self.trainee.load_reference(self.bema.weights())
        return {"bema/updated": float(updated), "bema/ref_updated": float(ref_updated),
                "bema/num_updates": float(self.bema.num_updates)}

    def report(self, plan: Plan, records, common: dict[str, float]) -> dict[str, float]:
        """``loss``, ``rewards/{chosen, rejected, margins, accuracies}``, ``logps/{chosen, rejected}``,
        ``policy_accuracy`` (share with logp_c > logp_r), ``grad_norm`` (before clipping), ``lr``,
        ``learner/{pairs, tokens}``, ``step`` (t after the step) and, with BEMA, ``bema/updated``,
        ``bema/ref_updated`` (1 or 0) and ``bema/num_updates``."""
        return mean_by_pairs(records) | common | {"learner/pairs": float(len(plan.context["pairs"])),
                                                  "step": float(self.step)}

    @torch.no_grad()
    def evaluate(self, pairs: list[PreferencePair]) -> dict[str, float]:
        """Held-out metrics, means over ``pairs``: ``eval/loss``, ``eval/rewards/*``, ``eval/logps/*``,
        ``eval/policy_accuracy``; no parameter changes, no autograd graph."""
        records = []
        for micro in self._micro(pairs):
            loss, metrics = self._loss(micro.batch, normalizer=float(micro.batch.num_pairs))  # the micro-batch mean
            if micro.real:
                records.append((metrics | {"loss": loss.item()}, micro.batch.num_pairs))
        records = [r for part in dist_.gather_objects(records, self.trainee.rank) for r in part]
        return {f"eval/{key}": value for key, value in mean_by_pairs(records).items()}

    # -- state ---------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def save(self, directory: Path) -> None:
        """With BEMA: ``bema.safetensors`` (one per rank in a group) and ``bema.json``."""
        if self.bema is None:
            return
        tensors, meta = self.bema.state_dict()
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  dist_.shard_file(directory, "bema", self.trainee.rank, "safetensors"))
        if self.trainee.rank.leader:
            (directory / "bema.json").write_text(json.dumps(meta))

    def load(self, directory: Path) -> None:
        if self.bema is not None:
            meta = json.loads((directory / "bema.json").read_text())
            self.bema.load_state_dict(load_file(dist_.shard_file(directory, "bema", self.trainee.rank,
                                                                 "safetensors")), meta)

    def save_bema(self, directory: Path) -> None:
        """The BEMA-averaged weights in Hugging Face format (frozen parameters as in the policy; with LoRA the
        adapter, in peft's format), with the tokenizer; TRL's ``output_dir/bema``. Every rank of a group calls it."""
        if self.bema is None:
            raise ValueError("save_bema: dpo.bema is None, so there are no BEMA weights")
        trainee = self.trainee
        keep = None if trainee.peft is None else lora_.is_adapter_parameter
        state = dist_.full_state_dict(trainee.model, copy=True, keep=keep)
        params = dict(trainee.model.named_parameters())
        with torch.no_grad():
            for name, value in self.bema.weights().items():  # this rank's shard of each: gathered whole
                state[name].copy_(dist_.full(dist_.like_shard(value, params[name])))
        trainee.save_policy(directory, state)


def DPOLearner(model_cfg: ModelConfig, dpo_cfg: DPOConfig, learner_cfg: LearnerConfig, seed: int = 0,
               model: torch.nn.Module | None = None, rank: Rank = SINGLE) -> Learner:
    """The DPO learner: ``model`` (default: ``model_cfg``'s, in float32) trained for :class:`DPO`. The reference is
    a frozen copy of the policy; with LoRA and no BEMA, the policy with its adapter disabled (no second copy)."""
    trainee = dpo_trainee(model_cfg, dpo_cfg, learner_cfg, seed, rank, model)
    return Learner(trainee, DPO(trainee, dpo_cfg))


def dpo_trainee(model_cfg: ModelConfig, dpo_cfg: DPOConfig, learner_cfg: LearnerConfig, seed: int = 0,
                rank: Rank = SINGLE, model: torch.nn.Module | None = None) -> Trainee:
    """DPO's trainee: its reference a frozen copy of the policy, or with LoRA and no BEMA the adapter disabled."""
    reference = "copy" if model_cfg.lora is None or dpo_cfg.bema is not None else "adapter_off"
    return Trainee(model_cfg, learner_cfg, seed, rank, reference, model)


def dpo_learner(cfg: RLFleetConfig, rank: Rank) -> Learner:
    """The learner actor's ``make_learner`` for ``rlfleet dpo``."""
    return DPOLearner(cfg.model, cfg.dpo, cfg.learner, cfg.seed, rank=rank)
