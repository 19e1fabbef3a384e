"""The memory estimate (rlfleet/cluster/memory.py), by hand, and its logits term against the peaks that
bench/logprob_memory.py measured (bench/results/logprob_memory.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlfleet.cluster.memory import (ENGINE_PROCESS_GIB, GIB, LEARNER_PROCESS_GIB, LOGIT_COPIES, count_parameters,
                                    estimate, job_estimate, logit_positions)
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
