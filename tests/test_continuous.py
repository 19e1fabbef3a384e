"""Continuous generation on the real engine and the tiny model: a completion whose first tokens were sampled under
version v and the rest under v + 1, with the load placed between two chosen engine steps (the loop driven by the
test through ``run_once``, so nothing depends on timing).

Reference log-probs come from independent transformers forward passes of the same fp32 weights:
- ``recompute``: every token's behaviour log-prob equals a clean forward pass under that token's own weights;
- ``keep``: a token sampled after the load equals the new weights' forward on top of the old weights' KV cache of
  everything before the last pre-load token (what the engine really sampled from), and differs from a clean forward
  of the new weights (printed: how far ``keep`` is from a clean forward on this model).
"""

import copy
import itertools

import pytest
import torch

from rlfleet.config import GenerationConfig, ModelConfig
from rlfleet.generation.continuous import ContinuousEngine, EngineStopped
from rlfleet.generation.engine import Engine
from rlfleet.models import load_causal_lm

pytestmark = pytest.mark.vllm

T = 0.7
GEN = GenerationConfig(num_generations=2, max_completion_length=24, temperature=T)
PROMPT = list(b"The quick brown fox jumps")
BEFORE = 5  # tokens sampled before the load: the prefill step samples the first, each decode step one more
VERSIONS = itertools.count(1)  # every load a new version: the prefix cache is salted by version


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    threads = torch.get_num_threads()
    yield Engine(ModelConfig(name_or_path=tiny_model_path), GEN, seed=0)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    return load_causal_lm(tiny_model_path).eval()


@pytest.fixture(scope="module")
def perturbed(hf_model):
    model = copy.deepcopy(hf_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def token_logprobs(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    return (logits.float() / T).log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def clean(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token under ``model`` alone."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
    return token_logprobs(logits, completion)


def kept(old, new, prompt: list[int], completion: list[int], k: int) -> torch.Tensor:
    """Log-probs of ``completion[k:]`` as sampled by ``new`` after a load that kept the KV cache: the keys and
    values of ``prompt + completion[:k-1]`` come from ``old``; ``completion[k-1]`` (sampled under ``old``, fed back
    in the first step after the load) and everything after it are computed by ``new``."""
    with torch.no_grad():
        past = old(torch.tensor([prompt + completion[:k - 1]]), use_cache=True).past_key_values
        logits = new(torch.tensor([completion[k - 1:-1]]), past_key_values=past, use_cache=True).logits[0]
    return token_logprobs(logits, completion[k:])


def sample_across_load(engine, kv_on_update: str, state: dict) -> tuple[list, int, dict]:
    """Sample ``GEN.num_generations`` completions of PROMPT, loading ``state`` after ``BEFORE`` engine steps;
    returns the groups, the version before the load and the loop's stats."""
    base = next(VERSIONS)
    engine.load_weights(engine_state := state["old"], version=base)  # batched path: the old weights, cache clean
    continuous = ContinuousEngine(engine, kv_on_update, start=False)
    assert continuous.version == base
    group = continuous.submit(PROMPT, n=GEN.num_generations)
    for _ in range(BEFORE):
        assert continuous.run_once()
    loaded = continuous.load_async(state["new"], version=base + 1)
    while not group.done():
        continuous.run_once()
    assert loaded.done() and loaded.exception() is None and continuous.version == base + 1
    del engine_state
    return group.result(), base, continuous.stats()


@pytest.fixture
def states(hf_model, perturbed):
    return {"old": hf_model.state_dict(), "new": perturbed.state_dict()}


def test_recompute_every_token_matches_its_own_weights(engine, hf_model, perturbed, states):
    out, v, stats = sample_across_load(engine, "recompute", states)
    # the loop's time: one load, timed apart from the steps; a loop stepped by the caller never waits for work
    assert stats["sync/inflight_loads"] == 1 and stats["engine/load_s"] > 0 and stats["engine/idle_s"] == 0
    assert stats["engine/steps"] == max(len(c.token_ids) for c in out) and stats["engine/busy_s"] > 0
    for c in out:
        assert len(c.token_ids) > BEFORE  # the load landed inside the completion
        assert c.versions == [v] * BEFORE + [v + 1] * (len(c.token_ids) - BEFORE)
        got = torch.tensor(c.logprobs)
        assert (got[:BEFORE] - clean(hf_model, PROMPT, c.token_ids)[:BEFORE]).abs().max() < 1e-4
        assert (got[BEFORE:] - clean(perturbed, PROMPT, c.token_ids)[BEFORE:]).abs().max() < 1e-4
        # the new weights' tokens are not the old weights' (the test can tell them apart)
        assert (got[BEFORE:] - clean(hf_model, PROMPT, c.token_ids)[BEFORE:]).abs().max() > 1e-2


def test_keep_samples_from_the_new_weights_over_the_old_cache(engine, hf_model, perturbed, states):
    out, v, _ = sample_across_load(engine, "keep", states)
    for c in out:
        assert c.versions == [v] * BEFORE + [v + 1] * (len(c.token_ids) - BEFORE)
        got = torch.tensor(c.logprobs)
        assert (got[:BEFORE] - clean(hf_model, PROMPT, c.token_ids)[:BEFORE]).abs().max() < 1e-4
        assert (got[BEFORE:] - kept(hf_model, perturbed, PROMPT, c.token_ids, BEFORE)).abs().max() < 1e-4
        gap = (got[BEFORE:] - clean(perturbed, PROMPT, c.token_ids)[BEFORE:]).abs()
        print(f"keep vs a clean forward of the new weights: max {gap.max():.4f}, mean {gap.mean():.4f} nats/token")
        assert gap.max() > 1e-3  # keep is not recompute: the old cache shows


def test_new_requests_after_a_load_never_reuse_the_old_weights_cache(engine, perturbed, states):
    """A prompt cached under the old weights, sampled again after a load (keep): all of it is the new weights'."""
    base = next(VERSIONS)
    engine.load_weights(states["old"], version=base)
    continuous = ContinuousEngine(engine, "keep")  # the loop thread this time
    try:
        long_prompt = list(b"abcdefghij" * 20)  # 200 tokens: more than one KV block, so the prefix cache holds it
        continuous.sample([long_prompt], n=2)
        continuous.load_weights(states["new"], version=base + 1)
        out = continuous.sample([long_prompt], n=2)[0]
        for c in out:
            assert c.versions == [base + 1] * len(c.token_ids)
            assert (torch.tensor(c.logprobs) - clean(perturbed, long_prompt, c.token_ids)).abs().max() < 1e-4
        assert continuous.busy_s > 0 and continuous.steps > 0
    finally:
        continuous.shutdown()
    with pytest.raises(EngineStopped):
        continuous.submit(long_prompt, n=1).result()


def test_a_load_waits_for_pinned_requests(engine, states):
    """An evaluation's requests (pinned) finish under the weights they started with, the load queued meanwhile
    lands after them, and an unpinned request submitted with them is sampled across the load."""
    base = next(VERSIONS)
    engine.load_weights(states["old"], version=base)
    continuous = ContinuousEngine(engine, "keep", start=False)
    with continuous.pinned():
        evaluation = continuous.submit(PROMPT, n=2)
    continuous.run_once()
    loaded = continuous.load_async(states["new"], version=base + 1)
    while not evaluation.done():
        continuous.run_once()
        assert not loaded.done() or evaluation.done()
    assert all(c.versions == [base] * len(c.token_ids) for c in evaluation.result())
    continuous.run_once()  # no request in flight: the held load runs first
    assert loaded.done() and continuous.version == base + 1
