"""The vLLM engine wrapper on the real engine and the tiny model: shapes, behaviour log-probs, weight updates.

Reference log-probs come from an independent computation: a transformers forward pass of the same fp32 weights on
prompt + completion, ``log_softmax(logits / T)`` at each completion position.
"""

import copy

import pytest
import torch

from rlfleet.generation.engine import Engine
from rlfleet.config import GenerationConfig, ModelConfig
from rlfleet.models import EOS_ID, load_causal_lm

pytestmark = pytest.mark.vllm

T = 0.7
MAX_TOKENS = 16
GEN = GenerationConfig(num_generations=4, max_completion_length=MAX_TOKENS, temperature=T, kv_cache_space_gib=0.25)
LONG = list(b"abcdefghij" * 20)  # 200 tokens: longer than one 128-token KV block, so the prefix cache holds it
SHORT = list(b"Hi")


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    threads = torch.get_num_threads()
    yield Engine(ModelConfig(name_or_path=tiny_model_path), GEN, seed=0)
    torch.set_num_threads(threads)  # vLLM sets torch to 1 thread for serving; later modules get theirs back


def test_the_kv_cache_is_the_configured_fraction_of_a_gib(engine):
    """generation.kv_cache_space_gib: 0.25 reaches vLLM as kv_cache_memory_bytes, and its blocks fill exactly that:
    blocks x block size x the tiny model's bytes per token (2 x layers x KV heads x head dim x 4, from its config)."""
    from rlfleet.models import kv_bytes_per_token

    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert cache.kv_cache_memory_bytes == 2**28
    assert cache.num_gpu_blocks * cache.block_size * kv_bytes_per_token("builtin:tiny", 4) == 2**28


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    return load_causal_lm(tiny_model_path).eval()


def hf_logprobs(model, prompt, completion, top_k=None):
    """log_softmax(logits / T) of each completion token; with ``top_k`` over the k largest logits only."""
    ids = torch.tensor([prompt + completion])  # [1, P + L]
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / T  # [L, V]
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [L, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]  # [L]


def max_logprob_error(model, prompts, out, top_k=None):
    return max(
        (torch.tensor(c.logprobs) - hf_logprobs(model, p, c.token_ids, top_k)).abs().max().item()
        for p, group in zip(prompts, out)
        for c in group
    )


def test_sample_returns_n_completions_per_prompt_with_flags(engine):
    """Each completion ends with EOS (not truncated) or has MAX_TOKENS tokens without EOS (truncated)."""
    prompts = [LONG, SHORT, [65]]
    out = engine.sample(prompts, n=4)
    assert [len(group) for group in out] == [4, 4, 4]
    for group in out:
        assert len({tuple(c.token_ids) for c in group}) > 1  # n independent samples, not one repeated
        for c in group:
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= MAX_TOKENS
            assert all(-float("inf") < lp <= 0 for lp in c.logprobs)
            assert EOS_ID not in c.token_ids[:-1]
            assert c.truncated == (c.token_ids[-1] != EOS_ID)
            if c.truncated:
                assert len(c.token_ids) == MAX_TOKENS


def test_behaviour_logprobs_match_transformers(engine, hf_model):
    """vLLM's processed log-probs equal log_softmax(logits / T) of the HF forward pass within 1e-4 (fp32)."""
    prompts = [LONG, SHORT]
    assert max_logprob_error(hf_model, prompts, engine.sample(prompts, n=4)) < 1e-4


def test_top_k_logprobs_are_of_the_truncated_distribution(engine, hf_model):
    """With top_k = 5 the engine reports log p over the 5 kept tokens, renormalised: it matches HF's top-5
    log_softmax and exceeds the full-vocabulary log-prob by -log(kept mass) > 0 (as the module docstring says)."""
    engine.generation = GEN.model_copy(update={"top_k": 5})
    try:
        out = engine.sample([LONG, SHORT], n=4)
    finally:
        engine.generation = GEN
    assert max_logprob_error(hf_model, [LONG, SHORT], out, top_k=5) < 1e-4
    for prompt, group in zip([LONG, SHORT], out):
        for c in group:
            assert (torch.tensor(c.logprobs) > hf_logprobs(hf_model, prompt, c.token_ids) + 1e-3).all()


def eos_boosted(model):
    """A copy of the tiny Qwen2 whose every next token is EOS, by construction.

    In the last layer, v_proj = 0 with bias 1 makes every head's attention output the ones vector (a convex
    combination of equal values); o_proj = outer(u, 1) * 100 / 128 turns it into 100 u, with u = E_eos / |E_eos|;
    the MLP's down_proj = 0 adds nothing. The final hidden state is then ~100 u (other terms are O(1)), so after
    RMSNorm n ~ sqrt(128) u, and with E_eos scaled by 20 (tied lm_head): logit_eos = sqrt(128) * 20 * |E_eos|
    ~ 11.3 * 20 * 0.226 ~ 51 (init std 0.02 gives |E_eos| ~ 0.02 * sqrt(128)), while every other logit is
    sqrt(128) u . E_v ~ N(0, 0.23). At T = 0.7 EOS has probability 1 - O(e^-60).
    """
    boosted = copy.deepcopy(model)
    layer, emb = boosted.model.layers[-1], boosted.model.embed_tokens.weight
    with torch.no_grad():
        u = emb[EOS_ID] / emb[EOS_ID].norm()
        layer.self_attn.v_proj.weight.zero_()
        layer.self_attn.v_proj.bias.fill_(1.0)
        width = layer.self_attn.o_proj.weight.shape[1]
        layer.self_attn.o_proj.weight.copy_(torch.outer(u, torch.ones(width)) * 100 / width)
        layer.mlp.down_proj.weight.zero_()
        emb[EOS_ID] *= 20
    return boosted


def test_load_weights_in_place_follows_new_weights(engine, hf_model):
    """After load_weights the engine's log-probs match HF with the new weights (also for the 200-token prompt,
    whose first KV block was cached under the old weights), the version is reported, and the EOS-boosted weights
    make every completion a lone EOS that is not truncated."""
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    engine.sample([LONG], n=2)  # fill the prefix cache with the old weights' KV blocks
    perturbed = copy.deepcopy(hf_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():  # tied embedding / lm_head perturbed once
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    try:
        engine.load_weights(perturbed.state_dict(), version=1)
        assert engine.version == 1
        out = engine.sample([LONG, SHORT], n=4)
        assert max_logprob_error(perturbed, [LONG, SHORT], out) < 1e-4
        assert max_logprob_error(hf_model, [LONG, SHORT], out) > 1e-2  # the old weights would not match

        boosted = eos_boosted(hf_model)
        engine.load_weights(boosted.state_dict(), version=2)
        out = engine.sample([LONG, SHORT], n=4)
        assert engine.version == 2
        assert all(c.token_ids == [EOS_ID] and not c.truncated for group in out for c in group)
        assert max_logprob_error(boosted, [LONG, SHORT], out) < 1e-4
    finally:
        engine.load_weights(original, version=0)
    assert max_logprob_error(hf_model, [LONG], engine.sample([LONG], n=2)) < 1e-4
