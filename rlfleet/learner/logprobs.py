"""Log-probabilities of completion tokens under a Hugging Face causal LM: what every objective's loss starts from.

:func:`completion_logprobs` on a padded batch (rows of prompt + completion, completions starting at a common column),
whole, chunked over the output layer, or packed without padding; :func:`shard_for_learning` FSDP2-shards a model so that
the chunked pass still gathers the root's parameters. Pure torch: no Ray, no learner state.
"""

from __future__ import annotations

from functools import partial
from types import MethodType

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlfleet.learner import distributed as dist_


def completion_logprobs(model: torch.nn.Module, batch, temperature: float, chunk_tokens: int = 0,
                        pack: bool = False) -> Tensor:
    """``log softmax(logits / temperature)`` at each completion token, float32, ``[B, T]``.

    Completions start at column ``P`` of ``input_ids``, so the logits of the last ``T + 1`` positions, minus the
    last, predict the ``T`` completion tokens (HF's ``logits_to_keep``: only ``[B, T, V]`` logits are built).
    Values on padding are finite and meaningless (0 when packed); the mask removes them.

    With ``chunk_tokens`` > 0 and more than that many completion positions, the full ``[B, T, V]`` logits are never
    built: the model's decoder gives the hidden states, and the output layer and the log-softmax run on
    ``chunk_tokens`` positions at a time, each chunk under activation checkpointing (its logits are rebuilt in the
    backward pass instead of kept), so the peak holds one chunk's logits. Same values up to float rounding.

    With ``pack``, the rows' real tokens are packed without padding into rows no longer than the padded batch's
    (:func:`pack_rows`; one row of everything for a model whose logits are not ``head(hidden)``); positions restart
    at 0 for each sequence and no attention mask is given, from which Hugging Face's mask code builds a
    block-diagonal causal mask (``find_packed_sequence_indices``): each sequence attends only to itself, as when
    padded, and a row's trailing padding is a sequence of its own that nothing reads. Attention without a varlen
    kernel (SDPA on CPU) computes a row's whole block-diagonal square, so rows as long as the padded batch's keep it
    at most the padded cost, where one row of every sequence grew with the micro-batch's square (bench/RESULTS.md
    section 20). Logits are built only where they predict a real completion token. Same values up to float
    rounding.
    """
    B, T = batch.completion_ids.shape
    splittable = _decoder_and_head(model) is not None
    chunked = splittable and 0 < chunk_tokens < B * T
    if pack:
        real = batch.attention_mask.bool()  # [B, P+T]
        completion = real[:, -T:]  # [B, T] the real completion tokens
        inputs, flat_at = _packed(batch.input_ids, batch.position_ids, real, several_rows=splittable)
        index = flat_at[:, -T:][completion] - 1  # [K] the packed positions whose logits predict them
        targets = batch.completion_ids[completion]  # [K]
        if splittable and not chunked:  # several rows: the logits at index only, as one chunk
            chunked, chunk_tokens = True, max(len(index), 1)
    else:
        inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
                  "attention_mask": batch.attention_mask}
        S = batch.input_ids.shape[1]
        index = (torch.arange(B, device=batch.input_ids.device)[:, None] * S + (S - T - 1)
                 + torch.arange(T, device=batch.input_ids.device)[None, :]).flatten()  # [B*T] in [B*S]
        targets = batch.completion_ids.flatten()  # [B*T]
    if chunked:
        run = getattr(model, CHUNKED_METHOD, None) or partial(chunked_logprobs, model)  # FSDP-registered if sharded
        values = run(inputs, index, targets, temperature, chunk_tokens)
    elif pack:  # one row (a model whose logits are computed whole)
        logits = model(**inputs, use_cache=False, logits_to_keep=index).logits[0]  # [K, V]
        values = token_logprobs(logits, targets, temperature)
    else:
        out = model(**inputs, use_cache=False, logits_to_keep=T + 1)
        return token_logprobs(out.logits[:, :-1], batch.completion_ids, temperature)  # [B, T]
    if not pack:
        return values.view(B, T)
    return torch.zeros((B, T), dtype=values.dtype, device=values.device).masked_scatter(completion, values)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the sequences (indices into ``lengths``) in rows of at most ``capacity`` tokens each,
    longest first; a sequence longer than ``capacity`` gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[r].append(i)
            room[r] -= lengths[i]
    return rows


def _packed(input_ids: Tensor, position_ids: Tensor, real: Tensor,
            several_rows: bool) -> tuple[dict[str, Tensor], Tensor]:
    """The packed inputs (``[R, L]`` ids and positions) of the padded ``[B, S]`` rows' real tokens, and ``[B, S]``
    each real token's index in the flattened ``[R * L]`` layout. Rows of at most ``S`` tokens (``several_rows``), or
    one row of everything."""
    lengths = real.sum(1).tolist()
    rows = pack_rows(lengths, real.shape[1] if several_rows else sum(lengths))
    L = max(sum(lengths[b] for b in row) for row in rows)
    ids = torch.zeros((len(rows), L), dtype=input_ids.dtype, device=input_ids.device)  # padding: any token
    positions = torch.zeros((len(rows), L), dtype=position_ids.dtype, device=position_ids.device)
    flat_at = torch.zeros(real.shape, dtype=torch.long, device=input_ids.device)
    for r, row in enumerate(rows):
        at = 0
        for b in row:
            n = lengths[b]
            ids[r, at:at + n] = input_ids[b][real[b]]
            positions[r, at:at + n] = position_ids[b][real[b]]
            flat_at[b, real[b]] = torch.arange(r * L + at, r * L + at + n, device=input_ids.device)
            at += n
        positions[r, at:] = torch.arange(L - at, device=position_ids.device)  # the padding: a sequence of its own
    return {"input_ids": ids, "position_ids": positions}, flat_at


@torch.no_grad()
def check_packing(model: torch.nn.Module) -> None:
    """Refuse ``learner.pack_sequences`` for a model whose attention does not keep packed sequences apart (one that
    builds its causal mask without Hugging Face's packed-sequence detection, as some remote-code models do): the
    logits of a sequence packed after another must equal the sequence's alone. Without this check such a model
    would train on sequences that see each other, silently."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    first, second = torch.arange(3, 8, device=device) % vocab, torch.arange(11, 15, device=device) % vocab
    ids = torch.cat([first, second])[None]  # [1, 9]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))]).to(device)[None]
    packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, len(first):].float()
    alone = model(input_ids=second[None], position_ids=positions[:, len(first):], use_cache=False).logits[0].float()
    gap = (packed - alone).abs().max().item()
    if not gap <= 1e-3 * max(1.0, alone.abs().max().item()):
        raise ValueError(f"learner.pack_sequences: {type(model).__name__} does not keep packed sequences apart (a "
                         f"sequence packed after another gets logits {gap:.3g} away from its own: its attention "
                         "ignores the restarting positions); set learner.pack_sequences: false")

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
        if torch.is_grad_enabled() and len(index) > chunk_tokens:  # one chunk: kept for the backward pass
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


def shard_for_learning(model: torch.nn.Module) -> None:
    """FSDP2-shard ``model`` (:func:`~rlfleet.learner.distributed.shard_model`) and register the chunked log-prob
    pass as one of its forward methods: it calls the decoder and the output layer directly, which the root's
    ``forward`` hooks (gathering embeddings and output layer, reducing their gradients) would otherwise miss."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    dist_.shard_model(model)
    if _decoder_and_head(model) is not None:
        setattr(model, CHUNKED_METHOD, MethodType(chunked_logprobs, model))
        register_fsdp_forward_method(model, CHUNKED_METHOD)

