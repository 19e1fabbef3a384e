"""The policy learner: GRPO / GSPO / GSPO-token optimisation steps on batches of :class:`~rlfleet.types.Group`.

Plain class, no Ray: :class:`~rlfleet.learner.actor.LearnerActor` wraps it, and tests run it in-process.

One ``train_step(groups)``:

1. **Collate** the groups into one padded batch (:func:`collate`): prompts left-padded to a common length ``P``,
   completions right-padded to ``T``, so every completion starts at column ``P``; positions count real tokens
   only, so padding changes no log-probability.
2. **Log-probabilities** of the completion tokens, ``log softmax(logits / temperature)`` at the sampled tokens
   (:func:`completion_logprobs`), the same temperature-scaled distribution the generator's behaviour log-probs
   ``behaviour_logprobs`` were taken from.
3. **One normaliser** for the whole optimizer step (``loss_normalizer`` over the full batch's mask), so the
   micro-batch losses of ``learner.micro_batch_size`` sequences sum to the full-batch loss and the gradient does
   not depend on micro-batching. Backward per micro-batch, then gradient clipping and one optimizer step.
4. ``num_iterations`` (mu) passes over the same batch, each ending with an optimizer step (decoupled PPO):

   * mu == 1: the ratio's base (the *proximal* policy) is the behaviour policy itself, ``behaviour_logprobs`` from
     the generator, and no importance weights are used: the clipped ratio pi_theta / pi_behaviour does the
     off-policy correction.
   * mu > 1: the proximal policy is the learner's own policy before the first update (log-probs computed without
     gradient, detached), so the first pass has ratio 1 and later passes are clipped against it, as in PPO. The
     gap between that proximal policy and the (possibly stale) behaviour policy is corrected by truncated
     importance weights ``min(pi_proximal / pi_behaviour, importance_sampling_cap)`` on the policy term
     (:func:`importance_weights`; per token, or per sequence for the sequence levels), when the cap is set.
   * ``algorithm.rollout_correction`` (truncate / mask) at any mu: the proximal policy is the learner's own
     pre-step policy (at mu == 1 the pass's log-probs, detached: the ratio is 1 in value, the gradient PG's), and
     the policy term is weighted by ``rollout_weights``: the engine-vs-learner ratio of each token (each token's own
     behaviour log-prob, whatever weights sampled it), sequence or geometric mean, truncated or masked to a band.

   Every step logs the gap between the engine's and the learner's pre-step log-probs (``rollout/kl``,
   ``rollout/ratio/min`` and ``/max``: :func:`~rlfleet.learner.losses.rollout_gap`), corrected or not.

   The lr schedule advances once per ``train_step``: ``max_steps`` and ``warmup_steps`` count train steps, and
   the mu passes over one batch share its lr. ``policy_version`` counts train steps, i.e. weight publications: the
   staleness bound is in these units.

Parameters are kept in float32 (master weights). When ``model.dtype`` resolves to bfloat16/float16 (GPU with
"auto") the forward passes run under autocast in that dtype: AdamW updates of ~lr * 1 = 1e-6 on bfloat16 weights of
magnitude ~1e-2 round away (8-bit mantissa), so pure bfloat16 parameters would mostly not learn. ``weights()``
hands the engine the parameters cast to the compute dtype. The frozen reference model (loaded only when
``beta > 0``) is kept in the compute dtype directly.

The step is deterministic: dropout is disabled (as the generator samples without it), nothing is shuffled, and no
random number is drawn, so ``seed`` is only recorded.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from functools import partial
from types import MethodType
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlfleet import lora as lora_
from rlfleet.config import AlgorithmConfig, GenerationConfig, LearnerConfig, ModelConfig
from rlfleet.learner import distributed as dist_
from rlfleet.learner.distributed import SINGLE, Rank, micro_batches
from rlfleet.learner.losses import loss_normalizer, make_policy_loss, rollout_gap, rollout_weights
from rlfleet.models import float32_attention_on_cpu, load_causal_lm, load_tokenizer, torch_dtype
from rlfleet.types import Group
from rlfleet.learner.state_files import load_optimizer, save_optimizer
from rlfleet.transport.packed import PackedWeights, WeightPacker, unpack


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces: collation, log-probabilities, importance weights, lr schedule
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One optimizer step's sequences, padded. ``P`` = longest prompt, ``T`` = longest completion."""

    input_ids: Tensor  # [B, P+T] long  prompt left-padded to P, completion right-padded to T
    attention_mask: Tensor  # [B, P+T] long  1 on real tokens
    position_ids: Tensor  # [B, P+T] long  0-based index among the row's real tokens
    completion_ids: Tensor  # [B, T] long
    mask: Tensor  # [B, T] float  1 on completion tokens that are trained on
    behaviour_logprobs: Tensor  # [B, T] float  behaviour log-probs, 0 on padding
    advantages: Tensor  # [B] float

    @property
    def size(self) -> int:
        return int(self.advantages.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def split(self, micro_batch_size: int, rank: Rank = SINGLE) -> list[tuple[Batch, bool]]:
        """This rank's micro-batches of at most ``micro_batch_size`` sequences, each with ``real`` (False for a
        filler whose loss counts 0: :func:`~rlfleet.learner.distributed.micro_batches`)."""
        return [(self.rows(m.start, m.stop), m.real) for m in micro_batches(self.size, micro_batch_size, rank)]


def collate(groups: list[Group], pad_id: int, mask_truncated_completions: bool = False) -> Batch:
    """Pad the groups' rows into one :class:`Batch`, rows in group order.

    Row ``i`` with prompt ``p`` (length ``P_i``) and completion ``c`` (length ``L_i``) becomes
    ``[pad] * (P - P_i) + p + c + [pad] * (T - L_i)``; ``mask[i, t] = 1`` for ``t < L_i`` where the token is the
    model's (``Group.loss_mask``: an environment's tokens in a multi-turn episode are context, never trained), and
    the whole row is 0
    when ``mask_truncated_completions`` and the completion was truncated (TRL's semantics; its advantage was
    still computed with the group).
    """
    if not groups:
        raise ValueError("collate: got no groups; a train step needs at least one group")
    prompts = [g.prompt_token_ids for g in groups for _ in range(g.size)]
    lengths = np.concatenate([g.completion_lengths for g in groups]).astype(np.int64)  # [B]
    B, P, T = len(prompts), max(len(p) for p in prompts), max(int(lengths.max()), 1)
    input_ids = np.full((B, P + T), pad_id, dtype=np.int64)  # [B, P+T]
    attention_mask = np.zeros((B, P + T), dtype=np.int64)  # [B, P+T]
    completion_ids = np.full((B, T), pad_id, dtype=np.int64)  # [B, T]
    behaviour_logprobs = np.zeros((B, T), dtype=np.float32)  # [B, T]
    row = 0
    for g in groups:
        for j in range(g.size):
            n, prompt = int(g.completion_lengths[j]), g.prompt_token_ids
            completion_ids[row, :n] = g.completion_ids[j, :n]
            behaviour_logprobs[row, :n] = g.behaviour_logprobs[j, :n]
            input_ids[row, P - len(prompt) : P] = prompt
            input_ids[row, P : P + n] = completion_ids[row, :n]
            attention_mask[row, P - len(prompt) : P + n] = 1
            row += 1
    mask = np.zeros((B, T), dtype=np.float32)  # [B, T]
    row = 0
    for g in groups:
        width = min(g.completion_ids.shape[1], T)
        mask[row:row + g.size, :width] = g.model_token_mask[:, :width]
        row += g.size
    if mask_truncated_completions:
        mask *= ~np.concatenate([g.truncated for g in groups])[:, None]
    attention = torch.from_numpy(attention_mask)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),  # [B, P+T]
        completion_ids=torch.from_numpy(completion_ids),
        mask=torch.from_numpy(mask),
        behaviour_logprobs=torch.from_numpy(behaviour_logprobs),
        advantages=torch.from_numpy(np.concatenate([g.advantages for g in groups]).astype(np.float32)),
    )


def completion_logprobs(model: torch.nn.Module, batch: Batch, temperature: float, chunk_tokens: int = 0,
                        pack: bool = False) -> Tensor:
    """``log softmax(logits / temperature)`` at each completion token, float32, ``[B, T]``.

    Completions start at column ``P`` of ``input_ids``, so the logits of the last ``T + 1`` positions, minus the
    last, predict the ``T`` completion tokens (HF's ``logits_to_keep``: only ``[B, T, V]`` logits are built).
    Values on padding are finite and meaningless (0 when packed); the mask removes them.

    With ``chunk_tokens`` > 0 and more than that many completion positions, the full ``[B, T, V]`` logits are never
    built: the model's decoder gives the hidden states, and the output layer and the log-softmax run on
    ``chunk_tokens`` positions at a time, each chunk under activation checkpointing (its logits are rebuilt in the
    backward pass instead of kept), so the peak holds one chunk's logits. Same values up to float rounding.

    With ``pack``, the rows' real tokens are concatenated into one row without padding; positions restart at 0 for
    each sequence and no attention mask is given, from which Hugging Face's mask code builds a block-diagonal
    causal mask (``find_packed_sequence_indices``): each sequence attends only to itself, as when padded. Logits
    are built only where they predict a real completion token. Same values up to float rounding.
    """
    B, T = batch.completion_ids.shape
    split = _decoder_and_head(model) if 0 < chunk_tokens < B * T else None
    if pack:
        real = batch.attention_mask.bool()  # [B, P+T]
        completion = real[:, -T:]  # [B, T] the real completion tokens
        packed_at = real.flatten().cumsum(0).view(real.shape) - 1  # [B, P+T] each real token's packed index
        inputs = {"input_ids": batch.input_ids[real][None], "position_ids": batch.position_ids[real][None]}  # [1, N]
        index = packed_at[:, -T:][completion] - 1  # [K] the packed positions whose logits predict them
        targets = batch.completion_ids[completion]  # [K]
    else:
        inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
                  "attention_mask": batch.attention_mask}
        S = batch.input_ids.shape[1]
        index = (torch.arange(B, device=batch.input_ids.device)[:, None] * S + (S - T - 1)
                 + torch.arange(T, device=batch.input_ids.device)[None, :]).flatten()  # [B*T] in [B*S]
        targets = batch.completion_ids.flatten()  # [B*T]
    if split is not None:
        run = getattr(model, CHUNKED_METHOD, None) or partial(chunked_logprobs, model)  # FSDP-registered if sharded
        values = run(inputs, index, targets, temperature, chunk_tokens)
    elif pack:
        logits = model(**inputs, use_cache=False, logits_to_keep=index).logits[0]  # [K, V]
        values = token_logprobs(logits, targets, temperature)
    else:
        out = model(**inputs, use_cache=False, logits_to_keep=T + 1)
        return token_logprobs(out.logits[:, :-1], batch.completion_ids, temperature)  # [B, T]
    if not pack:
        return values.view(B, T)
    return torch.zeros((B, T), dtype=values.dtype, device=values.device).masked_scatter(completion, values)


CHUNKED_METHOD = "rlfleet_chunked_logprobs"


def chunked_logprobs(model: torch.nn.Module, inputs: dict[str, Tensor], index: Tensor, targets: Tensor,
                     temperature: float, chunk_tokens: int) -> Tensor:
    """:func:`completion_logprobs`'s chunked pass: the decoder's hidden states (``inputs``), flattened to
    ``[rows * positions, H]``; at the positions ``index`` the output layer and the log-softmax of ``targets`` run
    ``chunk_tokens`` positions at a time; ``[len(index)]``. On an FSDP2-sharded model it runs as a registered forward
    method (:func:`shard_for_learning`), so the root's parameters (embeddings, output layer) are gathered for it."""
    decoder, head = _decoder_and_head(model)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state  # [rows, positions, H]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])[index]  # [K, H]
    parts = []
    for start in range(0, len(index), chunk_tokens):
        h, ids = flat_hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_logprobs, head, h, ids, temperature, use_reentrant=False))
        else:
            parts.append(_head_logprobs(head, h, ids, temperature))
    return torch.cat(parts) if parts else flat_hidden.new_zeros(0)


def token_logprobs(logits: Tensor, token_ids: Tensor, temperature: float) -> Tensor:
    """``log softmax(logits / temperature)`` at ``token_ids``, in float32: ``[..., V], [...] -> [...]``."""
    logits = logits.float() / temperature
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _head_logprobs(head: torch.nn.Module, hidden: Tensor, token_ids: Tensor, temperature: float) -> Tensor:
    return token_logprobs(head(hidden), token_ids, temperature)


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """The decoder (hidden states) and the output layer of a Hugging Face causal LM whose logits are exactly
    ``head(hidden)``; None for models that transform the logits further (soft-capping, scaling), which are then
    computed whole."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    config = getattr(model, "config", None)
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is model:
        return None
    if any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale")):
        return None
    return decoder, head


def importance_weights(
    proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, level: str, cap: float
) -> Tensor:
    """Truncated importance weights of the learner's proximal policy against the behaviour policy, ``[B, T]``.

    token level:                 w_{i,t} = min(exp(prox_{i,t} - beh_{i,t}), cap)
    sequence / sequence_token:   w_i     = min(exp(sum_t m_{i,t} (prox_{i,t} - beh_{i,t})), cap), same on every t
    (the sequence probability ratio, as TRL's ``sequence_truncate`` vLLM correction). Padding contributes a log
    ratio of 0. No gradient flows (both inputs are detached log-probs).
    """
    log_ratio = (proximal_logprobs - behaviour_logprobs) * mask  # [B, T]
    if level != "token":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)  # [B, T]
    return log_ratio.clamp(max=math.log(cap)).exp()  # [B, T]


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak lr at 0-based scheduler step ``step`` (Hugging Face's schedules).

    Warmup: step / warmup_steps for step < warmup_steps (so 0 at step 0). Then, with
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps): constant 1; linear max(0, 1 - progress);
    cosine 0.5 * (1 + cos(pi * min(progress, 1))).
    """
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"learner.lr_scheduler_type: unknown schedule {schedule!r}; use constant, linear or cosine")


def combine_loss_metrics(records: list[tuple[dict[str, float], float]], num_passes: int) -> dict[str, float]:
    """Combine the loss metrics of every micro-batch of every pass; ``records`` holds (metrics, valid tokens).

    ``loss/policy`` is already normalised per step, so micro-batches sum (then / ``num_passes``); ``*/min`` and
    ``*/max`` take the NaN-ignoring min / max; every other key is a token mean: sum(v * n) / sum(n) (0 without
    tokens).
    """
    tokens = sum(n for _, n in records)
    out: dict[str, float] = {}
    for key in records[0][0] if records else []:
        values = [m[key] for m, _ in records]
        if key == "loss/policy":
            out[key] = sum(values) / num_passes
        elif key.endswith(("/min", "/max")):
            real = [v for v in values if not math.isnan(v)]
            out[key] = (min if key.endswith("/min") else max)(real) if real else math.nan
        else:
            out[key] = sum(v * n for v, (_, n) in zip(values, records)) / max(tokens, 1.0)
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------------
# The learner
# ----------------------------------------------------------------------------------------------------------------


def shard_for_learning(model: torch.nn.Module) -> None:
    """FSDP2-shard ``model`` (:func:`~rlfleet.learner.distributed.shard_model`) and register the chunked log-prob
    pass as one of its forward methods: it calls the decoder and the output layer directly, which the root's
    ``forward`` hooks (gathering embeddings and output layer, reducing their gradients) would otherwise miss."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    dist_.shard_model(model)
    if _decoder_and_head(model) is not None:
        setattr(model, CHUNKED_METHOD, MethodType(chunked_logprobs, model))
        register_fsdp_forward_method(model, CHUNKED_METHOD)


def prepare_for_training(model: torch.nn.Module, gradient_checkpointing: bool) -> None:
    """Dropout off (the loss compares log-probs with the engine's, which has none), optional gradient
    checkpointing, train mode (HF applies gradient checkpointing in train mode only)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def make_optimizer(params, cfg: LearnerConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with ``cfg``'s lr, betas and weight decay, and its lr schedule (:func:`lr_factor`)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    schedule = partial(lr_factor, schedule=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps,
                       max_steps=cfg.max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class PolicyLearner:
    """Policy (+ frozen reference when beta > 0), AdamW, lr schedule; ``train_step`` on groups.

    ``policy_version`` counts train steps (weight publications) since the initial weights (version 0).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        algorithm_cfg: AlgorithmConfig,
        learner_cfg: LearnerConfig,
        generation_cfg: GenerationConfig,
        seed: int = 0,
        rank: Rank = SINGLE,
    ):
        self.model_cfg, self.algorithm = model_cfg, algorithm_cfg
        self.cfg, self.generation = learner_cfg, generation_cfg
        self.logprob_chunk_tokens = learner_cfg.logprob_chunk_tokens
        self.seed, self.rank = seed, rank
        self.device = resolve_device(learner_cfg.device)
        self.compute_dtype = torch_dtype(model_cfg.dtype, self.device.type)
        self.packer = WeightPacker(self.compute_dtype)
        self.tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code)
        # A sharded learner loads on the host: fully_shard moves only this rank's shard to the device.
        load_on = "cpu" if rank.sharded else str(self.device)
        self.model = load_causal_lm(model_cfg.name_or_path, torch.float32, load_on,
                                    model_cfg.trust_remote_code)
        float32_attention_on_cpu(self.model, self.compute_dtype, self.device)
        self.lora = model_cfg.lora
        self.peft = None if self.lora is None else lora_.add_adapter(self.model, self.lora, seed)  # frozen base
        prepare_for_training(self.model, learner_cfg.gradient_checkpointing)
        self.ref_model = None
        if algorithm_cfg.beta > 0 and self.lora is None:  # with LoRA the reference is the adapter disabled
            self.ref_model = load_causal_lm(model_cfg.name_or_path, self.compute_dtype, load_on,
                                            model_cfg.trust_remote_code).eval().requires_grad_(False)
            float32_attention_on_cpu(self.ref_model, self.compute_dtype, self.device)
        if rank.sharded:  # after gradient checkpointing is set up, before the optimizer sees the parameters
            shard_for_learning(self.model)
            if self.ref_model is not None:
                shard_for_learning(self.ref_model)
        self.loss_fn = make_policy_loss(algorithm_cfg)
        self.optimizer, self.scheduler = make_optimizer([p for p in self.model.parameters() if p.requires_grad],
                                                        learner_cfg)
        self.policy_version = 0
        self.step = 0  # train_step calls completed

    def _logprobs(self, model: torch.nn.Module, batch: Batch) -> Tensor:
        """[B, T] completion log-probs, under autocast when the compute dtype is not float32."""
        with torch.autocast(self.device.type, dtype=self.compute_dtype,
                            enabled=self.compute_dtype != torch.float32):
            return completion_logprobs(model, batch, self.generation.temperature, self.logprob_chunk_tokens,
                                       self.cfg.pack_sequences)

    @torch.no_grad()
    def _detached_logprobs(self, model: torch.nn.Module, micro: list[Batch]) -> list[Tensor]:
        return [self._logprobs(model, mb) for mb in micro]

    def _reference_logprobs(self, micro: list[Batch]) -> list[Tensor | None]:
        """The frozen reference's log-probs (beta > 0): the reference model's, or with LoRA the policy's with its
        adapter disabled (the base model, without a second copy of its weights)."""
        if self.algorithm.beta == 0:
            return [None] * len(micro)
        if self.peft is not None:
            with self.peft.disable_adapter():
                return self._detached_logprobs(self.model, micro)
        return self._detached_logprobs(self.ref_model, micro)

    def _gather_records(self, records: list, total_loss: float) -> tuple[list, float]:
        """Every rank's loss records and summed loss (the step's, as one process on the whole batch had them)."""
        parts = dist_.gather_objects((records, total_loss), self.rank)
        return [r for part, _ in parts for r in part], sum(loss for _, loss in parts)

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """mu optimizer steps on ``groups``; returns namespaced metrics: the loss's (see
        :func:`combine_loss_metrics`), ``loss``, ``grad_norm`` (before clipping; both averaged over the mu passes),
        ``lr``, reward and staleness statistics of the batch, ``learner/tokens`` (trained tokens),
        ``learner/sequences``, ``time/step_s`` and ``policy_version`` after the step."""
        start = time.perf_counter()
        alg = self.algorithm
        batch = collate(groups, self.tokenizer.pad_token_id, alg.mask_truncated_completions).to(self.device)
        normalizer = loss_normalizer(alg.loss_type, batch.mask, self.generation.max_completion_length)
        micro, real = zip(*batch.split(self.cfg.micro_batch_size, self.rank))  # this rank's rows
        refs = self._reference_logprobs(micro)
        if alg.num_iterations == 1:
            proximals, weights = [mb.behaviour_logprobs for mb in micro], [None] * len(micro)
        else:
            proximals = self._detached_logprobs(self.model, micro)
            capped = alg.importance_sampling_cap and alg.rollout_correction == "none"  # else the loop weighs them
            weights = [
                importance_weights(proximal, mb.behaviour_logprobs, mb.mask, alg.importance_sampling_level,
                                   alg.importance_sampling_cap) if capped else None
                for proximal, mb in zip(proximals, micro)
            ]
        version_before = self.policy_version
        lr = self.optimizer.param_groups[0]["lr"]
        records: list[tuple[dict[str, float], float]] = []  # (loss metrics, valid tokens) per micro-batch pass
        total_loss = total_grad_norm = 0.0
        for _ in range(alg.num_iterations):
            for mb, is_real, proximal, ref, w in zip(micro, real, proximals, refs, weights):
                logprobs = self._logprobs(self.model, mb)  # [b, T]
                # the learner's policy before the step: this pass's log-probs at mu = 1, the proximal's above
                before = logprobs.detach() if alg.num_iterations == 1 else proximal
                gap = rollout_gap(before, mb.behaviour_logprobs, mb.mask)
                if alg.rollout_correction != "none":
                    proximal, (w, corrected) = before, rollout_weights(
                        before, mb.behaviour_logprobs, mb.mask, alg.rollout_correction, alg.rollout_correction_level,
                        alg.rollout_correction_min, alg.rollout_correction_max)
                    gap |= corrected
                result = self.loss_fn(logprobs, proximal, mb.advantages, mb.mask, normalizer,
                                      ref_logprobs=ref, is_weights=w)
                result.metrics |= gap
                (result.loss if is_real else result.loss * 0.0).backward()
                if is_real:
                    total_loss += result.loss.item()
                    records.append((result.metrics, mb.mask.sum().item()))
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or math.inf)
            total_grad_norm += dist_.full(grad_norm).item()  # the norm over every rank's shard
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.policy_version += 1
        self.step += 1

        mu, num_tokens = alg.num_iterations, batch.mask.sum().item()
        records, total_loss = self._gather_records(records, total_loss)
        metrics = combine_loss_metrics(records, mu)
        metrics.update(batch_metrics(groups, version_before))
        metrics.update({
            "loss": total_loss / mu,
            "grad_norm": total_grad_norm / mu,
            "lr": lr,
            "learner/tokens": num_tokens,
            "learner/sequences": float(batch.size),
            "time/step_s": time.perf_counter() - start,
            "policy_version": float(self.policy_version),
        })
        return metrics

    def state_dict(self) -> dict[str, Tensor]:
        """What the engines load (:func:`engine_state`)."""
        return engine_state(self.model, self.lora, self.rank, self.compute_dtype)

    def packed_weights(self) -> PackedWeights:
        """The policy's state dict in the compute dtype, packed into the learner's reusable host buffer under Hugging
        Face names (every name of ``model.state_dict()``; tied ``lm_head.weight`` shares the embedding's bytes, and
        vLLM's loader skips the alias of a tied weight). Valid until the next call: ``ray.put`` it first."""
        return self.packer.pack(self.state_dict())

    def weights(self) -> dict[str, Tensor]:
        """A snapshot of :meth:`packed_weights` as CPU tensors (loads into a fresh HF model with ``strict=True``)."""
        packed = self.packed_weights()
        return unpack(PackedWeights(packed.buffer.copy(), packed.slots))

    def save(self, directory: str | Path) -> None:
        """Policy and tokenizer in HF format (float32, whole: a learner group gathers it), the optimizer's state
        (one safetensors file per rank) and ``scheduler.json`` (:mod:`rlfleet.learner.state_files`),
        ``learner.json`` (policy_version, step). Every rank of a group calls it with the same directory."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if self.peft is None:
            save_policy(self.model, self.tokenizer, path, self.rank)
        else:
            save_adapter(self.peft, self.tokenizer, path, self.rank)
        save_optimizer(self.optimizer, self.scheduler, path, self.rank)
        if self.rank.leader:
            (path / "learner.json").write_text(json.dumps({"policy_version": self.policy_version, "step": self.step}))

    def save_merged(self, directory: str | Path) -> None:
        """Base + adapter merged (``model.lora.save_merged``): :func:`save_merged`."""
        save_merged(self.model, self.peft, self.tokenizer, self.lora, Path(directory), self.rank)

    def load(self, directory: str | Path) -> None:
        """Restore what :meth:`save` wrote, with no unpickling. Checkpoints of earlier versions (``optimizer.pt``,
        ``scheduler.pt``) are read with ``torch.load(weights_only=True)``."""
        path = Path(directory)
        if self.peft is None:
            load_policy(self.model, path, self.model_cfg.trust_remote_code)
        else:
            load_adapter(self.model, path)
        if (path / "optimizer.pt").exists() and not self.rank.sharded:
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device,
                                                      weights_only=True))
            self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        else:
            load_optimizer(self.optimizer, self.scheduler, path, self.rank)
        state = json.loads((path / "learner.json").read_text())
        self.policy_version, self.step = int(state["policy_version"]), int(state["step"])


def engine_state(model: torch.nn.Module, lora, rank: Rank, compute_dtype: torch.dtype) -> dict[str, Tensor]:
    """What the engines load: the policy's whole state dict under Hugging Face names, or with ``model.lora`` (``lora``)
    the adapter's tensors under peft's names. ``model.state_dict()`` itself with one rank; with a learner group,
    gathered one tensor at a time in the compute dtype (a collective: every rank calls it, in the same order, and
    every rank gets the tensors)."""
    keep = None if lora is None else lora_.is_adapter_parameter
    if not rank.sharded:
        state = model.state_dict()
        state = state if keep is None else {k: v for k, v in state.items() if keep(k)}
    else:
        state = dist_.full_state_dict(model, compute_dtype, keep=keep)
    return state if lora is None else lora_.adapter_state(state)


def save_merged(model: torch.nn.Module, peft_model, tokenizer, lora, path: Path, rank: Rank = SINGLE) -> None:
    """Base + adapter merged (``model.lora.save_merged``), in Hugging Face format with the tokenizer; every rank of a
    group calls it. ``model``: the policy with its adapter's layers; ``peft_model``: its peft wrapper."""
    state = lora_.merged_state(dist_.full_state_dict(model, copy=True), lora)
    if rank.leader:
        peft_model.get_base_model().save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)


def save_policy(model: torch.nn.Module, tokenizer, path: Path, rank: Rank = SINGLE,
                state: dict[str, Tensor] | None = None) -> None:
    """``model`` (or ``state``, its weights under its names) and the tokenizer in Hugging Face format, from the
    leader; a learner group gathers the sharded weights first (every rank calls this)."""
    if state is None and rank.sharded:
        state = dist_.full_state_dict(model)
    if rank.leader:
        model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)


def save_adapter(peft_model, tokenizer, path: Path, rank: Rank = SINGLE) -> None:
    """The adapter in peft's format (``adapter_model.safetensors``, ``adapter_config.json``: loadable with
    ``PeftModel.from_pretrained(base, path)``) and the tokenizer, from the leader; a learner group gathers the
    adapter's shards first (every rank calls this)."""
    model = peft_model.get_base_model()
    state = dist_.full_state_dict(model, keep=lora_.is_adapter_parameter) if rank.sharded else None
    if rank.leader:
        prefixed = None if state is None else {"base_model.model." + k: v for k, v in state.items()}
        peft_model.save_pretrained(path, state_dict=prefixed)
        tokenizer.save_pretrained(path)


def load_adapter(model: torch.nn.Module, path: Path) -> None:
    """Load the adapter :func:`save_adapter` wrote into ``model`` (peft-wrapped; each rank's shard when sharded).
    Raises naming the file when the checkpoint holds no adapter (written without ``model.lora``)."""
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise ValueError(f"{path}: no adapter_model.safetensors: this checkpoint was written without model.lora (a "
                         "full model); resume it with the same model.lora setting as the run that wrote it")
    saved = load_file(file)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if lora_.is_adapter_parameter(name):
                dist_.local(value).copy_(dist_.shard_of(saved[lora_.peft_name(name)], value))


def load_policy(model: torch.nn.Module, path: Path, trust_remote_code: bool) -> None:
    """Load Hugging Face weights into ``model``; into each rank's shard when it is FSDP-sharded."""
    saved = load_causal_lm(str(path), torch.float32, "cpu", trust_remote_code).state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            dist_.local(value).copy_(dist_.shard_of(saved[name], value))


def batch_metrics(groups: list[Group], policy_version: int) -> dict[str, float]:
    """Reward and staleness statistics of the batch. ``reward/std`` is the unbiased std of the scored (non-NaN)
    rewards (0 with fewer than two); staleness = ``policy_version`` - the group's version (its oldest token's).
    Per token, over the model's tokens: ``staleness/token_mean`` and ``token_max``; ``staleness/version_span_max``:
    the most versions one group's tokens spread over (above 0 only when weights loaded in flight)."""
    rewards = np.concatenate([g.rewards for g in groups]).astype(np.float64)  # [B]
    real = rewards[~np.isnan(rewards)]
    staleness = np.array([policy_version - g.policy_version for g in groups], dtype=np.float64)
    per_token = np.concatenate([policy_version - g.versions[g.model_token_mask] for g in groups])  # [tokens]
    lengths = np.concatenate([g.completion_lengths for g in groups]).astype(np.float64)  # [B]
    truncated = np.concatenate([g.truncated for g in groups])  # [B]
    ended = lengths[~truncated] if (~truncated).any() else np.zeros(1)  # TRL: 0 when none ended with EOS
    return _episode_metrics(groups) | {
        # TRL's names: completion lengths in tokens, the share cut by the length limit, and the lengths of those
        # that ended with EOS
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.mean()),
        "completions/mean_terminated_length": float(ended.mean()),
        "completions/min_terminated_length": float(ended.min()),
        "completions/max_terminated_length": float(ended.max()),
        "staleness/token_mean": float(per_token.mean()) if per_token.size else 0.0,
        "staleness/token_max": float(per_token.max()) if per_token.size else 0.0,
        "staleness/version_span_max": float(max(g.version_span for g in groups)),
        "reward/mean": float(real.mean()) if real.size else math.nan,
        "reward/std": float(real.std(ddof=1)) if real.size > 1 else 0.0,
        "frac_reward_zero_std": float(np.mean([not g.has_variance for g in groups])),
        "staleness/mean": float(staleness.mean()),
        "staleness/max": float(staleness.max()),
    }


def _episode_metrics(groups: list[Group]) -> dict[str, float]:
    """Multi-turn batches (groups with a loss mask): model turns per episode (runs of the model's tokens) and the
    environment's share of the completion tokens; nothing for single-turn batches."""
    if all(g.loss_mask is None for g in groups):
        return {}
    turns = tokens = model = 0
    for g in groups:
        mask = g.model_token_mask  # [n, T]
        starts = mask[:, :1].sum() + (mask[:, 1:] & ~mask[:, :-1]).sum()  # a turn starts where the mask turns on
        turns, tokens, model = turns + int(starts), tokens + int(g.completion_lengths.sum()), model + int(mask.sum())
    rows = sum(g.size for g in groups)
    return {"env/turns_per_episode": turns / rows, "env/token_frac": (tokens - model) / max(tokens, 1)}
