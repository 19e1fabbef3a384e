"""Evaluation while training (``logging.eval_steps`` on ``data.eval_split``): the generator's scoring of held-out
prompts, the config and preflight checks, and end to end with real engines: records at the right steps, with
rewards computed on the held-out split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlfleet.config import AlgorithmConfig, ConfigError, DataConfig, GenerationConfig, load_config
from rlfleet.data import load_prompt_dataset
from rlfleet.generation.engine import Completion
from rlfleet.generation.generator import Generator
from rlfleet.models import load_tokenizer

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
EOS = 256  # builtin:tiny's <|im_end|>


class LengthEngine:
    """Prompt i's samples have ``len(prompt) + j`` tokens (j-th sample); records the temperature asked for."""

    version, max_model_len = 3, 512

    def __init__(self):
        self.temperatures = []

    def sample(self, prompt_token_ids, n, temperature=None):
        self.temperatures.append(temperature)
        return [[Completion([97] * (len(p) + j - 1) + [EOS], [-1.0] * (len(p) + j), j == 2) for j in range(n)]
                for p in prompt_token_ids]


def by_length(prompts, completions, completion_ids=None, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def half_of_target(prompts, completions, completion_ids=None, *, target, **kwargs):
    """Scores only the completions of prompts whose target is 'x'."""
    return [0.5 if t == "x" else None for t in target]


def failing_on_z(prompts, completions, completion_ids=None, *, target, **kwargs):
    if "z" in target:
        raise RuntimeError("no z")
    return [1.0] * len(completions)


def records(*targets):
    return [{"prompt": "ab" * (i + 1), "prompt_id": f"e{i}", "target": t} for i, t in enumerate(targets)]


def generator(*funcs, weights=None):
    return Generator(LengthEngine(), load_tokenizer("builtin:tiny"), GenerationConfig(num_generations=2),
                     AlgorithmConfig(reward_funcs=["x"] * len(funcs), reward_weights=weights), list(funcs), weights)


def test_evaluate_scores_every_sample_of_the_held_out_prompts():
    """Prompts 'ab' and 'abab' (2 and 4 byte tokens), n = 3: lengths [2, 3, 4] and [4, 5, 6]. by_length: mean 4.
    half_of_target scores prompt 0's samples (target 'x') 0.5 and leaves prompt 1's unscored (None), so the
    combined rewards are [2.5, 3.5, 4.5, 4, 5, 6]: mean 25.5 / 6 = 4.25. One of the three samples of each prompt
    is truncated (j = 2)."""
    g = generator(by_length, half_of_target)
    stats = g.evaluate(records("x", "y"), n=3, temperature=0.0)
    assert g.engine.temperatures == [0.0]
    assert stats["eval/reward/mean"] == pytest.approx(4.25)
    assert stats["eval/reward/by_length/mean"] == pytest.approx(4.0)
    assert stats["eval/reward/half_of_target/mean"] == pytest.approx(0.5)
    assert stats["eval/prompts"] == 2 and stats["eval/samples"] == 6 and stats["eval/tokens"] == 24
    assert stats["eval/truncated_frac"] == pytest.approx(2 / 6) and stats["eval/errors"] == 0
    assert stats["policy_version"] == 3


def test_evaluate_leaves_out_the_prompts_a_failing_function_spoils():
    """failing_on_z raises on the batch holding a 'z' target: every prompt of the call is spoiled (as in training:
    the function's values for the batch are lost), so nothing is scored and each prompt is an error."""
    stats = generator(failing_on_z).evaluate(records("x", "z"), n=1, temperature=None)
    assert "eval/reward/mean" not in stats and stats["eval/errors"] == 2 and stats["eval/prompts"] == 0
    stats = generator(failing_on_z).evaluate(records("x", "y"), n=1)
    assert stats["eval/reward/mean"] == 1.0 and stats["eval/errors"] == 0


def test_eval_steps_needs_an_eval_split_and_greedy_needs_one_sample():
    with pytest.raises(ConfigError) as err:
        load_config(DEPLOY / "quickstart.yaml", ["logging.eval_steps=10"])
    assert any(p.startswith("data.eval_split: required by logging.eval_steps") for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        load_config(DEPLOY / "quickstart.yaml", ["logging.eval_steps=10", "data.eval_split=test",
                                                 "logging.eval_num_generations=4"])
    assert any(p.startswith("logging.eval_num_generations") for p in err.value.problems)
    load_config(DEPLOY / "quickstart.yaml", ["logging.eval_steps=10", "data.eval_split=test",
                                             "logging.eval_num_generations=4", "logging.eval_greedy=false"])


@pytest.mark.parametrize("dataset, split", [("builtin:target_length", "validation"), ("local", "test")])
def test_an_eval_split_the_dataset_lacks_fails_before_start(tmp_path, dataset, split):
    from rlfleet.cluster.preflight import preflight

    if dataset == "local":
        dataset = str(tmp_path / "prompts.jsonl")
        Path(dataset).write_text("".join(json.dumps({"prompt": f"p{i}", "target_length": 3}) + "\n"
                                         for i in range(4)))
    cfg = load_config(DEPLOY / "quickstart.yaml", [f"data.dataset={dataset}", f"data.eval_split={split}",
                                                   "logging.eval_steps=5"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert [p for p in err.value.problems if p.startswith(f"data.eval_split: {split!r} cannot be loaded")], \
        err.value.problems


def target_probe(prompts, completions, completion_ids=None, *, target_length, **kwargs):
    """A reward that tells the split: the prompt's target length / 100, whatever the completion."""
    return [t / 100 for t in target_length]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["batched", "continuous"])
def test_evaluations_run_at_their_steps_on_the_held_out_split(ray_cluster, tmp_path, engine):
    """The quickstart job (async, staleness 1) with eval_steps 3 over 8 steps: evaluations of steps 0 (the initial
    weights), 3, 6 and 8 (the end), each a line of its own with the weights of its step. With a reward that is the
    prompt's target / 100, eval/reward/mean is the mean target of the first 16 held-out prompts (computed here from
    the split itself), not of the training prompts. A continuous engine loads every publication in flight, so an
    evaluation due at step s evaluates the latest weights when it starts (s or later: where depends on scheduling)
    and names them; the weights it names are those it sampled with throughout (its pin holds loads back)."""
    from rlfleet.cluster.driver import train

    cfg = load_config(DEPLOY / "quickstart.yaml", [
        f"output_dir={tmp_path / 'job'}", "learner.max_steps=8", "checkpoint.save_steps=100", "logging.plot=false",
        "algorithm.reward_funcs=[tests.test_evaluation:target_probe]", "data.eval_split=test",
        "data.max_eval_prompts=16", "logging.eval_steps=3", "logging.eval_greedy=false",
        "logging.eval_num_generations=2", f"generation.engine={engine}"])
    train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval/reward/mean" in r]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    if engine == "batched":
        assert [r["step"] for r in evals] == [0, 3, 6, 8]
    else:
        evaluated = [r["step"] for r in evals]
        assert len(evaluated) == 4 and evaluated[0] == 0 and evaluated[-1] == 8 and evaluated == sorted(evaluated)
        assert all(due <= s for due, s in zip([0, 3, 6, 8], evaluated))
    assert all(r["policy_version"] == r["step"] for r in evals)  # each evaluated its own step's weights
    test_targets = load_prompt_dataset(DataConfig(dataset="builtin:target_length"), "test")["target_length"][:16]
    train_targets = load_prompt_dataset(DataConfig(dataset="builtin:target_length"), "train")["target_length"]
    expected = float(np.mean(test_targets)) / 100
    assert abs(expected - float(np.mean(train_targets)) / 100) > 1e-3  # the probe can tell the splits apart
    for r in evals:
        assert r["eval/reward/mean"] == pytest.approx(expected, abs=1e-6)
        assert r["eval/prompts"] == 16 and r["eval/samples"] == 32 and r["eval/errors"] == 0
        assert not any(k.startswith(("loss", "reward/")) for k in r)  # an evaluation's line holds only its own
    assert all(math.isfinite(r["reward/mean"]) for r in steps)
