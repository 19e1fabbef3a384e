"""LoRA (model.lora): adapters in the real vLLM engine registered in memory, the policy and DPO learners with peft,
checkpoints in peft's format, the merged model, checks before start, and jobs end to end on a local Ray cluster.

Reference log-probs come from Hugging Face forward passes of the base model with a peft adapter built here (or
disabled), independently of rlfleet's learner.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlfleet.config import (AlgorithmConfig, BEMAConfig, ConfigError, DataConfig, DPOConfig, GenerationConfig,
                            LearnerConfig, LoraConfig, ModelConfig, RLFleetConfig, load_config)
from rlfleet.lora import adapter_state, add_adapter, engine_rank, is_adapter_parameter
from rlfleet.models import load_causal_lm
from tests.test_policy_learner import two_groups

REPO = Path(__file__).resolve().parents[1]
LORA = LoraConfig(r=4)
GEN = GenerationConfig(num_generations=4, generation_batch_size=8, max_completion_length=10, temperature=0.7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_adapter(path: str, seed: int, cfg: LoraConfig = LORA):
    """The tiny model with a peft adapter whose B matrices are random (a fresh adapter's are 0: no effect)."""
    model = load_causal_lm(path).eval()
    wrapper = add_adapter(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, wrapper


@torch.no_grad()
def logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> np.ndarray:
    ids = torch.tensor([prompt + tokens])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1] / temperature  # [L, V]
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].numpy()


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_engine_samples_with_the_adapter_registered_in_memory(tiny_model_path):
    """After each update the engine's log-probs are those of base + that adapter (HF + peft), not the base's and not
    the previous adapter's; a fresh adapter (B = 0) gives the base model's: the engine's base weights never
    changed. The adapter travels as a publication's contents (kind ``adapter``, with its config, as the learner
    publishes it); full weights given to this engine are refused before anything is loaded."""
    from rlfleet.generation.engine import Engine
    from rlfleet.transport import FULL, published_contents

    engine = Engine(ModelConfig(name_or_path=tiny_model_path, lora=LORA), GEN, seed=0)
    base = load_causal_lm(tiny_model_path).eval()
    prompts = [list(b"hello there"), list(b"count: 1 2 3")]
    first, _ = random_adapter(tiny_model_path, seed=1)
    second, _ = random_adapter(tiny_model_path, seed=2)
    fresh = add_adapter(load_causal_lm(tiny_model_path).eval(), LORA).get_base_model()
    for version, model, others in ((1, first, (base, second)), (2, second, (base, first)), (3, fresh, ())):
        engine.load_weights(adapter_state(model.state_dict()), version, published_contents(LORA))
        assert engine.version == version
        for prompt, samples in zip(prompts, engine.sample(prompts, 2)):
            for c in samples:
                ours = np.array(c.logprobs)
                np.testing.assert_allclose(ours, logprobs(model, prompt, c.token_ids, GEN.temperature), atol=1e-4)
                for other in others:  # the test can tell adapters apart
                    assert np.abs(ours - logprobs(other, prompt, c.token_ids, GEN.temperature)).max() > 1e-2
    with pytest.raises(ValueError, match="loads adapter weights, not a publication of kind 'full'"):
        engine.load_weights(first.state_dict(), 4, FULL)
    assert engine.version == 3
    for prompt, samples in zip(prompts, engine.sample(prompts, 2)):  # version 3: B = 0, the base model
        for c in samples:
            np.testing.assert_allclose(c.logprobs, logprobs(base, prompt, c.token_ids, GEN.temperature), atol=1e-4)


@pytest.mark.vllm
def test_a_new_adapter_loads_in_flight_on_the_continuous_engine(tiny_model_path):
    """A completion started under adapter 1 takes adapter 2 mid-way (one engine step chosen by the test, which
    drives the loop): with ``recompute`` every token's behaviour log-prob equals HF + peft under the adapter of its
    own version, those sampled before the load adapter 1's and those after adapter 2's (each told apart from the
    other adapter's)."""
    from rlfleet.generation.continuous import ContinuousEngine
    from rlfleet.generation.engine import Engine
    from rlfleet.transport import published_contents

    engine = Engine(ModelConfig(name_or_path=tiny_model_path, lora=LORA), GEN.model_copy(
        update={"max_completion_length": 24}), seed=0)
    first, _ = random_adapter(tiny_model_path, seed=1)
    second, _ = random_adapter(tiny_model_path, seed=2)
    engine.load_weights(adapter_state(first.state_dict()), 1, published_contents(LORA))
    continuous = ContinuousEngine(engine, "recompute", start=False)
    prompt = list(b"hello there")
    group = continuous.submit(prompt, n=2)
    for _ in range(5):  # the prefill samples each completion's first token, every decode step one more
        assert continuous.run_once()
    loaded = continuous.load_async(adapter_state(second.state_dict()), 2, published_contents(LORA))
    while not group.done():
        continuous.run_once()
    assert loaded.result() == 2 and continuous.version == 2
    for c in group.result():
        assert len(c.token_ids) > 5, "the completion ended before the load"
        assert c.versions == [1] * 5 + [2] * (len(c.token_ids) - 5)
        ours = np.array(c.logprobs)
        under = {1: logprobs(first, prompt, c.token_ids, GEN.temperature),
                 2: logprobs(second, prompt, c.token_ids, GEN.temperature)}
        own = np.array([under[v][t] for t, v in enumerate(c.versions)])
        other = np.array([under[3 - v][t] for t, v in enumerate(c.versions)])
        np.testing.assert_allclose(ours, own, atol=1e-4)
        assert np.abs(ours[5:] - other[5:]).max() > 1e-2 and np.abs(ours[:5] - other[:5]).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# The policy learner
# ---------------------------------------------------------------------------------------------------------------


def policy_learner(beta: float = 0.0, lora: LoraConfig | None = LORA):
    from rlfleet.learner.policy import PolicyLearner

    return PolicyLearner(ModelConfig(lora=lora), AlgorithmConfig(beta=beta),
                         LearnerConfig(device="cpu", learning_rate=1e-2, max_grad_norm=None), GEN, seed=0)


def test_policy_learner_trains_and_publishes_the_adapter_only(tmp_path, tiny_model_path):
    learner = policy_learner()
    frozen = {n: p.detach().clone() for n, p in learner.model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_parameter(n) for n in trainable)
    assert not any(is_adapter_parameter(n) for n in frozen)
    for _ in range(2):
        learner.train_step(two_groups(learner.model))
    assert all(torch.equal(p, frozen[n]) for n, p in learner.model.named_parameters() if n in frozen)
    assert len(learner.optimizer.state) == len(trainable)  # AdamW state for the adapter alone
    published = learner.state_dict()
    expected = {"base_model.model." + n.replace(".default.", "."): p for n, p in learner.model.named_parameters()
                if p.requires_grad}
    assert published.keys() == expected.keys() and all(torch.equal(published[k], expected[k]) for k in expected)
    assert any(v.abs().sum() > 0 for k, v in published.items() if ".lora_B." in k)  # it learned something

    # the checkpoint: peft's format, loadable by PeftModel.from_pretrained; a fresh learner resumes exactly
    from peft import PeftModel

    learner.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "policy" / "adapter_config.json").is_file()
    assert not (tmp_path / "ckpt" / "policy" / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(load_causal_lm(tiny_model_path), str(tmp_path / "ckpt" / "policy")).eval()
    ids = torch.tensor([list(b"any tokens at all")])
    learner.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, learner.model(ids).logits, rtol=0, atol=1e-5)
    other = policy_learner()
    other.load(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), published.values()))
    assert other.policy_version == learner.policy_version == 2
    assert other.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()

    # merged: W + (alpha / r) B A in a plain HF model gives the adapted model's outputs
    learner.save_merged(tmp_path / "merged")
    merged = load_causal_lm(str(tmp_path / "merged")).eval()
    assert not any("lora" in n for n in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, learner.model(ids).logits, rtol=0, atol=1e-4)


def test_policy_reference_is_the_base_model_without_a_copy(tiny_model_path):
    """beta > 0 with LoRA: no reference model is loaded; the reference log-probs are the base model's, before and
    after training the adapter (its KL is 0 at the first step, when the fresh adapter is the base)."""
    from rlfleet.learner.logprobs import completion_logprobs
    from rlfleet.learner.policy import collate

    learner = policy_learner(beta=0.04)
    assert learner.ref_model is None
    first = learner.train_step(two_groups(learner.model))
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-7)
    second = learner.train_step(two_groups(learner.model))
    assert second["loss/kl"] > 1e-6
    batch = collate(two_groups(learner.model), 256)
    with learner.trainee.as_reference() as reference:
        ref = learner.trainee.logprobs(reference, batch, GEN.temperature)
    base = load_causal_lm(tiny_model_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref, completion_logprobs(base, batch, GEN.temperature), rtol=0, atol=1e-5)


def test_lora_checks_before_start(tmp_path):
    from rlfleet.cluster.preflight import model_problems

    assert engine_rank(4) == 8 and engine_rank(8) == 8 and engine_rank(300) == 320
    cfg = RLFleetConfig(model={"lora": {"r": 600, "target_modules": ["q_proj", "qkv"]}})
    problems = model_problems(cfg)
    assert problems[0] == ("model.lora.r: 600 is above the largest rank vLLM serves (512); use at most 512")
    assert problems[1].startswith("model.lora.target_modules: ['qkv'] are not modules of the model; its linear")
    assert "q_proj" in problems[1] and len(problems) == 2
    (problem,) = model_problems(RLFleetConfig(model={"lora": {"r": 8, "target_modules": ["q_proj", "lm_head"]}}))
    assert problem.startswith("model.lora.target_modules: ['lm_head']: vLLM's engines do not apply an adapter")
    with pytest.raises(ValueError, match="cluster.weight_transport: 'broadcast' sends whole models"):
        RLFleetConfig(model={"lora": {"r": 8}}, cluster={"weight_transport": "broadcast"})
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        load_config(None, ["model.lora={r: 8, dropout: 0.1}"])


# ---------------------------------------------------------------------------------------------------------------
# The DPO learner
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs():
    from rlfleet.dpo.data import PreferencePair, load_preference_dataset, tokenize_preferences
    from rlfleet.models import load_tokenizer

    ds = tokenize_preferences(load_preference_dataset(DataConfig(dataset="builtin:prefs"), "train"),
                              load_tokenizer("builtin:tiny"), max_length=64)
    return [PreferencePair.from_record(r) for r in ds.select(range(32))]


def dpo_learner(bema: dict | None = None):
    from rlfleet.dpo.learner import DPOLearner

    return DPOLearner(ModelConfig(lora=LORA), DPOConfig(beta=0.5, max_length=64,
                                                        bema=BEMAConfig(**bema) if bema else None),
                      LearnerConfig(device="cpu", learning_rate=1e-2, max_steps=20, micro_batch_size=16))


def test_dpo_with_lora_uses_the_base_as_reference(pairs, tiny_model_path):
    """No BEMA: no reference copy; the reference's sequence log-probs are the base model's after training, while the
    policy's have moved."""
    from rlfleet.dpo.learner import collate_pairs, sequence_logprobs

    learner = dpo_learner()
    assert learner.ref_model is None
    for i in range(3):
        learner.train_step(pairs[i * 8:(i + 1) * 8])
    batch = collate_pairs(pairs[:8], 256, 64)
    base = load_causal_lm(tiny_model_path).eval()
    with torch.no_grad():
        expected = sequence_logprobs(base, batch)
        with learner.peft.disable_adapter():
            torch.testing.assert_close(learner.logps(learner.model, batch), expected, rtol=0, atol=1e-4)
        assert (learner.logps(learner.model, batch) - expected).abs().max() > 1e-3


def test_dpo_bema_tracks_the_adapter_and_the_reference_is_base_plus_bema_adapter(pairs, tmp_path):
    learner = dpo_learner({"update_freq": 1, "ref_model_update_freq": 2, "bias_power": 0.2, "ema_power": 0.5,
                           "update_after": 0})
    assert learner.ref_model is not None
    tensors, _ = learner.bema.state_dict()
    assert tensors and all(is_adapter_parameter(k.split(".", 1)[1]) for k in tensors)  # theta0/ema/out.<name>
    for i in range(2):
        metrics = learner.train_step(pairs[i * 8:(i + 1) * 8])
    assert metrics["bema/ref_updated"] == 1.0
    ref = dict(learner.ref_model.named_parameters())
    for name, value in learner.bema.weights().items():
        assert is_adapter_parameter(name)
        torch.testing.assert_close(ref[name].float(), value, rtol=0, atol=0)
    policy = dict(learner.model.named_parameters())
    for name, p in ref.items():  # the base weights in the reference are the policy's (frozen) base weights
        if not is_adapter_parameter(name):
            assert torch.equal(p, policy[name]), name
    learner.save(tmp_path / "ckpt")
    other = dpo_learner({"update_freq": 1, "ref_model_update_freq": 2, "bias_power": 0.2, "ema_power": 0.5,
                         "update_after": 0})
    other.load(tmp_path / "ckpt")
    for (n, a), (_, b) in zip(learner.ref_model.named_parameters(), other.ref_model.named_parameters()):
        assert torch.equal(a, b), n
    learner.save_bema(tmp_path / "bema")
    assert (tmp_path / "bema" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Jobs end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_lora_grpo_job_learns_and_resumes(ray_cluster, tmp_path):
    """deploy/lora.yaml: reward on target_length rises with a rank-8 adapter; the run resumes from its checkpoint;
    the merged model is written at the end."""
    from rlfleet.cluster.driver import train

    out = tmp_path / "lora"
    overrides = [f"output_dir={out}", "logging.plot=false", "checkpoint.save_steps=40"]
    train(load_config(REPO / "deploy" / "lora.yaml", overrides + ["learner.max_steps=80"]))
    ckpt = out / "checkpoints" / "step-80" / "policy"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    summary = train(load_config(REPO / "deploy" / "lora.yaml", overrides + [
        "learner.max_steps=120", "checkpoint.resume=true", "model.lora.save_merged=true"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 121))
    assert [r["policy_version"] for r in records[80:]] == list(range(81, 121))
    first = sum(r["reward/mean"] for r in records[:20]) / 20
    last = sum(r["reward/mean"] for r in records[-20:]) / 20
    assert last > first + 0.1, (first, last)
    assert summary["merged"] == str(out / "merged") and (out / "merged" / "model.safetensors").is_file()
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.ray
@pytest.mark.slow
def test_lora_dpo_job_learns_and_resumes(ray_cluster, tmp_path):
    """deploy/dpo_lora.yaml: held-out accuracy of the implicit reward (against the base model as reference) starts at
    0 (no margin: the fresh adapter is the base) and passes 0.9 (measured: 1.0 at step 60); a resume from step 30
    continues at 31. The checkpoints hold the adapter and no reference model."""
    from rlfleet.cluster.dpo_job import train_dpo

    overrides = [f"output_dir={tmp_path}", "logging.plot=false"]
    first = train_dpo(load_config(REPO / "deploy" / "dpo_lora.yaml", overrides + ["learner.max_steps=30"]))
    assert first["step"] == 30
    saved = tmp_path / "checkpoints" / "step-30"
    assert (saved / "policy" / "adapter_model.safetensors").is_file()
    assert not (saved / "learner" / "reference.safetensors").exists()
    resumed = train_dpo(load_config(REPO / "deploy" / "dpo_lora.yaml", overrides + ["checkpoint.resume=true"]))
    assert resumed["step"] == 60
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(61))
    evals = {r["step"]: r for r in records if "eval/rewards/accuracies" in r}
    assert evals[0]["eval/rewards/accuracies"] == 0.0 and evals[0]["eval/rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert evals[60]["eval/rewards/accuracies"] >= 0.9
