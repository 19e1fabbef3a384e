"""The memory estimate (rlfleet/cluster/memory.py), by hand, and its logits term against the peaks that
bench/logprob_memory.py measured (bench/results/logprob_memory.json); what a refusal lists as fitting."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

from rlfleet.cluster.memory import (ENGINE_PROCESS_GIB, GIB, LEARNER_PROCESS_GIB, LOGIT_COPIES, count_parameters,
                                    estimate, job_estimate, logit_positions, memory_problems, ways_out)
from rlfleet.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_estimate_by_hand():
    """1M parameters, float32 engine, 1 GiB KV cache, bfloat16 reference and compute, 2048 logit positions x 1000
    tokens: generator = 0.75 + 1 + 2 x 4 MB; learner = 0.8 + (16 + 2) MB + 4 x 2048 x 1000 x 4 B + 2 x 2 MB
    published. On GPUs only the processes and the published host copies remain."""
    e = estimate(10**6, 4, 1.0, 2, logit_positions=2048, vocab=1000, publish_bytes_per_param=2)
    assert e.generator_gib == pytest.approx(ENGINE_PROCESS_GIB + 1.0 + 8e6 / GIB)
    assert e.learner_gib == pytest.approx(LEARNER_PROCESS_GIB + 18e6 / GIB + 4 * 2048 * 1000 * 4 / GIB + 4e6 / GIB)
    assert e.total_gib(3) == pytest.approx(e.learner_gib + 3 * e.generator_gib)
    on_gpus = estimate(10**6, 2, 1.0, 2, generator_on_gpu=True, learner_on_gpu=True, logit_positions=2048, vocab=1000,
                       publish_bytes_per_param=2)
    assert on_gpus.generator_gib == ENGINE_PROCESS_GIB
    assert on_gpus.learner_gib == pytest.approx(LEARNER_PROCESS_GIB + 4e6 / GIB)
    # a learner group of 2 ranks: two processes and two micro-batches' logits; the sharded weights, gradients, Adam
    # moments and reference add up to one model's; publishing gathers a whole bf16 copy on each rank (+2 x 2 MB)
    group = estimate(10**6, 4, 1.0, 2, logit_positions=2048, vocab=1000, publish_bytes_per_param=2, learner_ranks=2)
    assert group.learner_gib == pytest.approx(2 * LEARNER_PROCESS_GIB + 18e6 / GIB + 2 * 4 * 2048 * 1000 * 4 / GIB
                                              + (2 + 2) * 2e6 / GIB)
    assert group.generator_gib == e.generator_gib
    # colocated: the engine in the learner's process holds one float32 copy (4 MB) and nothing is published
    colocated = estimate(10**6, 4, 1.0, 2, logit_positions=2048, vocab=1000, colocated=True)
    assert colocated.generator_gib == pytest.approx(ENGINE_PROCESS_GIB + 1.0 + 4e6 / GIB)
    assert colocated.learner_gib == pytest.approx(e.learner_gib - 4e6 / GIB)

    # learner.offload_optimizer: a learner on a GPU keeps Adam's two moments (8 bytes a parameter) on the host; a
    # learner on the host already counts them
    offloaded = estimate(10**6, 2, 1.0, 2, generator_on_gpu=True, learner_on_gpu=True, logit_positions=2048,
                         vocab=1000, publish_bytes_per_param=2, offload_optimizer=True)
    assert offloaded.learner_gib == pytest.approx(on_gpus.learner_gib + 8e6 / GIB)
    assert estimate(10**6, 4, 1.0, 2, logit_positions=2048, vocab=1000, publish_bytes_per_param=2,
                    offload_optimizer=True) == e


def test_a_colocated_job_is_estimated_with_one_engine_copy_and_nothing_published():
    """The tiny model (329,344 parameters) in float32 with quickstart's 1 GiB cache: colocated, the job has the
    learner without the two published float32 copies (2 x 4 B a parameter) and one engine with one copy of
    the weights instead of two."""
    separate = job_estimate(load_config(ROOT / "deploy" / "quickstart.yaml"), with_reference=False)
    colocated = job_estimate(load_config(ROOT / "deploy" / "quickstart.yaml", ["cluster.colocate=true"]), False)
    params = 329_344
    assert separate.learner_gib - colocated.learner_gib == pytest.approx(2 * params * 4 / GIB)
    assert separate.generator_gib - colocated.generator_gib == pytest.approx(params * 4 / GIB)


def test_a_bfloat16_engine_beside_a_float32_learner_halves_the_engine_and_published_copies():
    """generation.dtype: bfloat16 with the float32 learner (tiny model, 329,344 parameters): each generator's two
    weight copies (the engine's and an update in flight) take 2 B a parameter instead of 4, so do the learner's two
    published copies (packed buffer, object-store object); the learner's own float32 weights, gradients and moments
    are unchanged."""
    fp32 = job_estimate(load_config(ROOT / "deploy" / "quickstart.yaml"), with_reference=False)
    bf16 = job_estimate(load_config(ROOT / "deploy" / "quickstart.yaml", ["generation.dtype=bfloat16"]), False)
    params = 329_344
    assert fp32.generator_gib - bf16.generator_gib == pytest.approx(2 * params * 2 / GIB)
    assert fp32.learner_gib - bf16.learner_gib == pytest.approx(2 * params * 2 / GIB)


def test_logit_positions_follow_micro_batch_length_and_chunk():
    long = ["learner.micro_batch_size=8", "generation.max_completion_length=448", "model.max_model_len=1024"]
    cfg = load_config(ROOT / "deploy" / "quickstart.yaml", long)
    assert logit_positions(cfg, dpo=False) == 1024  # 8 x 448 = 3584, built 1024 at a time (the default)
    cfg = load_config(ROOT / "deploy" / "quickstart.yaml", [*long, "learner.logprob_chunk_tokens=0"])
    assert logit_positions(cfg, dpo=False) == 3584
    cfg = load_config(ROOT / "deploy" / "dpo_quickstart.yaml", ["learner.logprob_chunk_tokens=0"])
    assert logit_positions(cfg, dpo=True) == cfg.learner.micro_batch_size * cfg.dpo.max_length


def test_tiny_model_is_counted_from_its_config():
    params, vocab = count_parameters("builtin:tiny")
    assert (params, vocab) == (329_344, 260)  # README's 330k parameters; 256 bytes + 4 special tokens
    e = job_estimate(load_config(ROOT / "deploy" / "quickstart.yaml"), with_reference=False)
    assert e.params == params and e.learner_gib > LEARNER_PROCESS_GIB


def test_logits_term_is_a_floor_of_the_measured_peaks():
    """The bench's log-prob pass (forward + backward, whole logits and chunks): the estimate's logits term stays
    below the measured peak (the estimate is a floor) and above half of it (it is the term that matters)."""
    run = json.loads((ROOT / "bench" / "results" / "logprob_memory.json").read_text())
    vocab, positions = 151_936, run["batch"] * run["completion"]
    for row, counted in zip(run["rows"], (positions, min(positions, run["chunk_tokens"]))):
        term = LOGIT_COPIES * counted * vocab * 4 / GIB
        assert 0.5 * row["peak_gib"] <= term <= row["peak_gib"], (row, term)


QWEN3_06B_SHAPE = {  # Qwen/Qwen3-0.6B's config: its shape only (no weights are read)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6}


def _refusal(overrides: list[str], generators: int, have_gib: float) -> tuple[str, object]:
    cfg = load_config(ROOT / "deploy" / "quickstart.yaml", overrides)
    options = functools.partial(ways_out, cfg, False, False)
    problems = memory_problems(job_estimate(cfg, False), generators, have_gib, "the cluster", options)
    assert len(problems) == 1
    return problems[0], cfg


def _listed(message: str) -> list[tuple[str, float]]:
    """The 'What would fit' lines: (the change, its estimate in GiB)."""
    return [(m[1], float(m[2])) for m in re.finditer(r"\n      (.+): about (\d+\.\d) GiB", message)]


def test_a_refusal_lists_the_changes_that_would_fit_with_their_estimates(tmp_path):
    """Issue 34's case: the Qwen3-0.6B shape (596M parameters), float32 on CPU, one generator, refused at 16.1 GiB.
    The refusal lists LoRA (with and without bfloat16), colocation with LoRA and colocation with a 2 GiB cache, each
    with the estimate the job would have with that change made as a user makes it (a dotted override), below 16.1;
    bfloat16 alone and colocation alone, which are not listed, stay above."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_06B_SHAPE))
    base = [f"model.name_or_path={tmp_path}", "generation.kv_cache_space_gib=4", "learner.micro_batch_size=8",
            "generation.max_completion_length=32"]
    message, cfg = _refusal(base, 1, 16.1)
    total = job_estimate(cfg, False).total_gib(1)
    assert total > 16.1 and f"or a machine or cluster with at least {total:.1f} GiB" in message
    listed = _listed(message)
    by_override = {"model.lora: {r: 16} and model.dtype: bfloat16": ["model.lora={r: 16}", "model.dtype=bfloat16"],
                   "cluster.colocate: true and model.lora: {r: 16}": ["cluster.colocate=true", "model.lora={r: 16}"],
                   "model.lora: {r: 16} (train an adapter)": ["model.lora={r: 16}"],
                   "cluster.colocate: true and generation.kv_cache_space_gib: 2": [
                       "cluster.colocate=true", "generation.kv_cache_space_gib=2"]}
    assert sorted(change for change, _ in listed) == sorted(by_override)
    assert [gib for _, gib in listed] == sorted(gib for _, gib in listed)  # the smallest first
    for change, gib in listed:
        user = load_config(ROOT / "deploy" / "quickstart.yaml", base + by_override[change])
        assert job_estimate(user, False).total_gib(1) == pytest.approx(gib, abs=0.05) and gib <= 16.1
    for alone in (["model.dtype=bfloat16"], ["cluster.colocate=true"], ["cluster.colocate=true",
                                                                        "generation.kv_cache_space_gib=3"]):
        assert job_estimate(load_config(ROOT / "deploy" / "quickstart.yaml", base + alone), False).total_gib(1) > 16.1


def test_fewer_generators_or_a_smaller_cache_are_listed_with_the_numbers_that_fit():
    """The tiny model, 4 generators with 4 GiB of KV cache each: 3 generators fit 19.3 GiB, and so do 4 with 3 GiB;
    at 3.5 GiB only one generator with 1 GiB does, alone or colocated; below the learner alone nothing does, and the
    refusal says so. Colocation (one engine, in the learner) fits 19.3 GiB too, alone, with LoRA and with a
    bfloat16 engine (whose estimate is the one a user's override gives, below colocation alone's)."""
    base = ["cluster.num_generators=4", "generation.kv_cache_space_gib=4"]
    message, _ = _refusal(base, 4, 19.3)
    listed = dict(_listed(message))
    colocate = "cluster.colocate: true and cluster.num_generators: 1"
    bf16_engine = f"{colocate} and generation.dtype: bfloat16"
    assert set(listed) == {"cluster.num_generators: 3", "generation.kv_cache_space_gib: 3", colocate,
                           f"{colocate} and model.lora: {{r: 16}}", bf16_engine}, message
    colocated = load_config(ROOT / "deploy" / "quickstart.yaml", ["cluster.colocate=true", base[1]])
    assert job_estimate(colocated, False).total_gib(1) == pytest.approx(listed[colocate], abs=0.05)
    bf16 = load_config(ROOT / "deploy" / "quickstart.yaml",
                       ["cluster.colocate=true", base[1], "generation.dtype=bfloat16"])
    assert job_estimate(bf16, False).total_gib(1) == pytest.approx(listed[bf16_engine], abs=0.05)
    assert job_estimate(bf16, False).total_gib(1) < job_estimate(colocated, False).total_gib(1)
    three = load_config(ROOT / "deploy" / "quickstart.yaml", base[1:])
    assert job_estimate(three, False).total_gib(3) == pytest.approx(listed["cluster.num_generators: 3"], abs=0.05)
    smaller = load_config(ROOT / "deploy" / "quickstart.yaml", [base[0], "generation.kv_cache_space_gib=3"])
    assert job_estimate(smaller, False).total_gib(4) <= 19.3
    message, _ = _refusal(base, 4, 3.5)
    assert [c for c, _ in _listed(message)] == [f"{colocate} and generation.kv_cache_space_gib: 1",
                                                "cluster.num_generators: 1 and generation.kv_cache_space_gib: 1"]
    message, _ = _refusal(base, 4, 0.5)
    assert "What would fit" not in message and "use a machine or cluster with more memory" in message


def test_a_cpu_kv_cache_that_cannot_hold_one_sequence_is_refused_naming_the_field(monkeypatch):
    """generation.kv_cache_space_gib takes fractions of a GiB (vLLM's kv_cache_memory_bytes). The tiny model's KV
    cache per token, from its config by hand (2 x layers x KV heads x head dim x 4 bytes in float32): a cache one
    token short of model.max_model_len is refused before any actor starts, naming the field and the least that
    fits; one of exactly max_model_len tokens passes, and so does any size where the engines are on GPUs (vLLM sizes
    their cache) or the environment sets VLLM_CPU_KVCACHE_SPACE."""
    from transformers import AutoConfig

    from rlfleet.cluster.preflight import kv_cache_problems
    from rlfleet.config import RLFleetConfig
    from rlfleet.models import resolve_model_path

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    c = AutoConfig.from_pretrained(resolve_model_path("builtin:tiny"))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * (c.num_key_value_heads or c.num_attention_heads) * head_dim * 4
    length = 512

    def problems(tokens: int, **cluster) -> list[str]:
        cfg = RLFleetConfig(model={"name_or_path": "builtin:tiny", "max_model_len": length},
                            generation={"kv_cache_space_gib": tokens * per_token / 2**30}, cluster=cluster)
        return kv_cache_problems(cfg)

    (problem,) = problems(length - 1)
    assert problem.startswith(f"generation.kv_cache_space_gib={(length - 1) * per_token / 2**30:g} holds "
                              f"{length - 1} tokens of this model")
    assert f"model.max_model_len={length}; raise it to at least" in problem
    assert problems(length) == []
    assert problems(1, generator_num_gpus=1) == []
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert problems(1) == []
    with pytest.raises(ValueError, match="kv_cache_space_gib"):
        RLFleetConfig(generation={"kv_cache_space_gib": 0})
    assert RLFleetConfig(generation={"kv_cache_space_gib": 0.25}).generation.kv_cache_space_gib == 0.25
