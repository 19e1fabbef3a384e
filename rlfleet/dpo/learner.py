"""The DPO learner: sigmoid DPO on preference pairs, with BEMA updates of the reference model.

Plain class, no Ray: :class:`~rlfleet.dpo.actor.DPOLearnerActor` wraps it, and tests run it in-process.

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
under autocast and the reference model is kept in that dtype (as :class:`~rlfleet.learner.policy.PolicyLearner`).
The step draws no random number (dropout off, no shuffling), so it is deterministic and ``seed`` is only recorded.

Checkpoints (:meth:`DPOLearner.save`) are read back without unpickling: the policy in Hugging Face format, and
safetensors + JSON for the optimizer, the scheduler, the reference model and the BEMA state.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlfleet.config import DPOConfig, LearnerConfig, ModelConfig
from rlfleet.dpo.bema import BEMA
from rlfleet.learner import distributed as dist_
from rlfleet.learner.distributed import SINGLE, Rank, micro_batches
from rlfleet.learner.losses import dpo_loss
from rlfleet import lora as lora_
from rlfleet.learner.policy import (completion_logprobs, load_adapter, load_policy, make_optimizer,
                                    prepare_for_training, resolve_device, save_adapter, save_policy,
                                    shard_for_learning)
from rlfleet.learner.state_files import load_optimizer, save_optimizer
from rlfleet.models import float32_attention_on_cpu, load_causal_lm, load_tokenizer, torch_dtype
from rlfleet.dpo.data import PreferencePair

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
    ``pack``: see :func:`~rlfleet.learner.policy.completion_logprobs`)."""
    return (completion_logprobs(model, batch, 1.0, chunk_tokens, pack) * batch.mask).sum(-1)  # [2B]


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A gradient-free eval-mode copy with its parameters (not its buffers: rotary frequencies stay float32) cast to
    ``dtype``; tied parameters stay tied."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    for p in ref.parameters():
        p.data = p.data.to(dtype)
    return ref


# ----------------------------------------------------------------------------------------------------------------
# The learner
# ----------------------------------------------------------------------------------------------------------------


def _mean_by_pairs(records: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Pair-weighted mean of per-micro-batch means: ``sum(v * b) / sum(b)``."""
    total = sum(b for _, b in records)
    return {key: sum(m[key] * b for m, b in records) / total for key in records[0][0]}


class DPOLearner:
    """Policy, frozen reference model, AdamW + lr schedule and optional BEMA; ``train_step`` on preference pairs.

    ``model``: an already-built policy (e.g. with frozen parameters), used as is; default: ``model_cfg``'s model
    loaded in float32. The reference starts as a copy of it. ``step`` counts optimizer steps (TRL's global_step).
    ``learner_cfg.micro_batch_size`` counts sequences, so a micro-batch holds ``max(1, micro_batch_size // 2)`` pairs.
    """

    def __init__(self, model_cfg: ModelConfig, dpo_cfg: DPOConfig, learner_cfg: LearnerConfig, seed: int = 0,
                 model: torch.nn.Module | None = None, rank: Rank = SINGLE):
        self.model_cfg, self.cfg, self.learner_cfg, self.seed, self.rank = model_cfg, dpo_cfg, learner_cfg, seed, rank
        self.device = resolve_device(learner_cfg.device)
        self.compute_dtype = torch_dtype(model_cfg.dtype, self.device.type)
        self.tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code)
        if model is None:
            # a sharded learner loads on the host: fully_shard moves only this rank's shard to the device
            model = load_causal_lm(model_cfg.name_or_path, torch.float32, "cpu" if rank.sharded else str(self.device),
                                   model_cfg.trust_remote_code)
        self.model = model if rank.sharded else model.to(self.device)
        float32_attention_on_cpu(self.model, self.compute_dtype, self.device)  # the reference copies it
        self.lora = model_cfg.lora
        self.peft = None if self.lora is None else lora_.add_adapter(self.model, self.lora, seed)  # frozen base
        prepare_for_training(self.model, learner_cfg.gradient_checkpointing)
        # With LoRA and no BEMA the reference is the policy with its adapter disabled: the base, no second copy.
        self.ref_model = None
        if self.peft is None or dpo_cfg.bema is not None:
            self.ref_model = frozen_copy(self.model, self.compute_dtype)
        if rank.sharded:  # policy and reference sharded alike; BEMA then tracks each rank's shard
            shard_for_learning(self.model)
            if self.ref_model is not None:
                shard_for_learning(self.ref_model)
        self.optimizer, self.scheduler = make_optimizer([p for p in self.model.parameters() if p.requires_grad],
                                                        learner_cfg)
        self.bema = BEMA(self.trainable(), dpo_cfg.bema, device="cpu") if dpo_cfg.bema is not None else None
        self.pairs_per_micro_batch = max(1, learner_cfg.micro_batch_size // 2)
        self.step = 0

    def trainable(self) -> dict[str, Tensor]:
        """The policy's parameters with ``requires_grad``, by name (tied parameters once); this rank's shards in a
        learner group (what BEMA tracks: its arithmetic is per element)."""
        return {name: dist_.local(p) for name, p in self.model.named_parameters() if p.requires_grad}

    def _micro_batches(self, pairs: list[PreferencePair]) -> list[tuple[PairBatch, bool]]:
        """This rank's micro-batches, each with ``real`` (False: a filler whose loss counts 0, see
        :func:`~rlfleet.learner.distributed.micro_batches`)."""
        pad = self.tokenizer.pad_token_id
        return [(collate_pairs(pairs[m.start:m.stop], pad, self.cfg.max_length).to(self.device), m.real)
                for m in micro_batches(len(pairs), self.pairs_per_micro_batch, self.rank)]

    def _gather(self, records: list) -> list:
        """Every rank's micro-batch records, in rank order."""
        return [r for part in dist_.gather_objects(records, self.rank) for r in part]

    def _logps(self, model: torch.nn.Module, batch: PairBatch) -> Tensor:
        """[2B] sequence log-probs, under autocast when the compute dtype is not float32."""
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            return sequence_logprobs(model, batch, self.learner_cfg.logprob_chunk_tokens,
                                     self.learner_cfg.pack_sequences)

    def _loss(self, batch: PairBatch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        """DPO loss of one micro-batch (``/ normalizer``) and its metrics (means over the micro-batch)."""
        b = batch.num_pairs
        with torch.no_grad():
            if self.ref_model is not None:
                ref = self._logps(self.ref_model, batch)  # [2b]
            else:
                with self.peft.disable_adapter():
                    ref = self._logps(self.model, batch)  # [2b]
        logps = self._logps(self.model, batch)  # [2b]
        result = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], self.cfg.beta, normalizer=normalizer)
        chosen, rejected = logps[:b].detach(), logps[b:].detach()
        result.metrics.update({
            "logps/chosen": float(chosen.mean()),
            "logps/rejected": float(rejected.mean()),
            "policy_accuracy": float((chosen > rejected).float().mean()),
        })
        return result.loss, result.metrics

    def train_step(self, pairs: list[PreferencePair]) -> dict[str, float]:
        """One optimizer step on ``pairs``, then the BEMA step. Metrics: ``loss``, ``rewards/{chosen, rejected,
        margins, accuracies}``, ``logps/{chosen, rejected}``, ``policy_accuracy`` (share with logp_c > logp_r),
        ``grad_norm`` (before clipping), ``lr``, ``learner/{pairs, tokens}``, ``time/step_s``, ``step`` (t after the
        step) and, with BEMA, ``bema/updated``, ``bema/ref_updated`` (1 or 0) and ``bema/num_updates``."""
        start = time.perf_counter()
        micro = self._micro_batches(pairs)
        lr = self.optimizer.param_groups[0]["lr"]
        records, total_loss, tokens = [], 0.0, 0.0
        for batch, real in micro:
            loss, metrics = self._loss(batch, normalizer=float(len(pairs)))
            (loss if real else loss * 0.0).backward()
            if real:
                total_loss += loss.item()
                tokens += batch.mask.sum().item()
                records.append((metrics, batch.num_pairs))
        records = self._gather(records)
        total_loss, tokens = dist_.all_reduce_sum([total_loss, tokens], self.rank)
        max_norm = self.learner_cfg.max_grad_norm or math.inf
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = dist_.full(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        metrics = _mean_by_pairs(records) | self._bema_step()
        metrics.update({
            "loss": total_loss,
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "learner/pairs": float(len(pairs)),
            "learner/tokens": tokens,
            "time/step_s": time.perf_counter() - start,
            "step": float(self.step),
        })
        return metrics

    @torch.no_grad()
    def _bema_step(self) -> dict[str, float]:
        """BEMA at absolute step t = ``self.step``; load its weights into the reference when due."""
        if self.bema is None:
            return {}
        updated = self.bema.step(self.step, self.trainable())
        ref_updated = self.bema.ref_update_due(self.step)
        if ref_updated:
            self._load_reference(self.bema.weights())
        return {"bema/updated": float(updated), "bema/ref_updated": float(ref_updated),
                "bema/num_updates": float(self.bema.num_updates)}

    @torch.no_grad()
    def _load_reference(self, weights: dict[str, Tensor]) -> None:
        """Copy ``weights`` (a subset of the parameter names) into the reference model, cast to its dtype."""
        params = dict(self.ref_model.named_parameters())
        for name, value in weights.items():
            dist_.local(params[name]).copy_(value)

    @torch.no_grad()
    def evaluate(self, pairs: list[PreferencePair]) -> dict[str, float]:
        """Held-out metrics, means over ``pairs``: ``eval/loss``, ``eval/rewards/*``, ``eval/logps/*``,
        ``eval/policy_accuracy``; no parameter changes, no autograd graph."""
        records = []
        for batch, real in self._micro_batches(pairs):
            loss, metrics = self._loss(batch, normalizer=float(batch.num_pairs))  # the micro-batch mean
            if real:
                records.append((metrics | {"loss": loss.item()}, batch.num_pairs))
        records = self._gather(records)
        return {f"eval/{key}": value for key, value in _mean_by_pairs(records).items()}

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """``policy/`` (HF model + tokenizer), the optimizer's state (``optimizer.safetensors`` + ``.json``, one per
        rank in a learner group) and ``scheduler.json``, ``reference.safetensors``, ``bema.safetensors`` +
        ``bema.json`` (with BEMA; the reference and BEMA files per rank too), ``learner.json`` (step). Every rank
        of a group calls it with the same directory."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if self.peft is None:
            save_policy(self.model, self.tokenizer, path / "policy", self.rank)
        else:
            save_adapter(self.peft, self.tokenizer, path / "policy", self.rank)
        save_optimizer(self.optimizer, self.scheduler, path, self.rank)
        if self.ref_model is not None:
            save_file({n: dist_.local(p).detach().to("cpu").contiguous()
                       for n, p in self.ref_model.named_parameters()},
                      dist_.shard_file(path, "reference", self.rank, "safetensors"))
        if self.bema is not None:
            tensors, meta = self.bema.state_dict()
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      dist_.shard_file(path, "bema", self.rank, "safetensors"))
            if self.rank.leader:
                (path / "bema.json").write_text(json.dumps(meta))
        if self.rank.leader:
            (path / "learner.json").write_text(json.dumps({"step": self.step}))

    def load(self, directory: str | Path) -> None:
        """Restore what :meth:`save` wrote, exactly (no unpickling anywhere), with a learner group of the size that
        wrote it."""
        path = Path(directory)
        if self.peft is None:
            load_policy(self.model, path / "policy", self.model_cfg.trust_remote_code)
        else:
            load_adapter(self.model, path / "policy")
        load_optimizer(self.optimizer, self.scheduler, path, self.rank)
        if self.ref_model is not None:
            dist_.check_shards(path, "reference", self.rank)
            reference = load_file(dist_.shard_file(path, "reference", self.rank, "safetensors"))
            names = [n for n, _ in self.ref_model.named_parameters()]
            if sorted(reference) != sorted(names):
                raise ValueError(f"{path}: the reference file's parameter names differ from the reference model's")
            self._load_reference(reference)
        if self.bema is not None:
            meta = json.loads((path / "bema.json").read_text())
            self.bema.load_state_dict(load_file(dist_.shard_file(path, "bema", self.rank, "safetensors")), meta)
        self.step = int(json.loads((path / "learner.json").read_text())["step"])

    def save_bema(self, directory: str | Path) -> None:
        """The BEMA-averaged weights in Hugging Face format (frozen parameters as in the policy), with the tokenizer;
        TRL's ``output_dir/bema``. Every rank of a group calls it."""
        if self.bema is None:
            raise ValueError("save_bema: dpo.bema is None, so there are no BEMA weights")
        if self.peft is not None:  # the BEMA adapter, in peft's format
            self._save_bema_adapter(Path(directory))
            return
        state = dist_.full_state_dict(self.model, copy=True)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.bema.weights().items():  # this rank's shard of each: gathered whole
                state[name].copy_(dist_.full(dist_.like_shard(value, params[name])))
        save_policy(self.model, self.tokenizer, Path(directory), self.rank, state=state)

    def _save_bema_adapter(self, directory: Path) -> None:
        state = dist_.full_state_dict(self.model, copy=True, keep=lora_.is_adapter_parameter)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.bema.weights().items():
                state[name].copy_(dist_.full(dist_.like_shard(value, params[name])))
        if self.rank.leader:
            self.peft.save_pretrained(directory, state_dict={"base_model.model." + k: v for k, v in state.items()})
            self.tokenizer.save_pretrained(directory)
