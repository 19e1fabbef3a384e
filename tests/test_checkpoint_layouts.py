"""Checkpoints of the three learner layouts written before one trainee core (tests/fixtures/checkpoints, by commit
3c4546a's code: see write_v1.py there) still load into today's learners, with what the learner held when it saved;
a loaded learner trains on, and its own checkpoint (today's layout) loads back to the same state."""

import json
import sys
from pathlib import Path

import pytest
import torch

from rlfleet.cluster import checkpoint as ckpt
from rlfleet.config import AlgorithmConfig, BEMAConfig, DPOConfig, GenerationConfig, LearnerConfig, ModelConfig
from rlfleet.dpo.learner import DPOLearner
from rlfleet.dpo.online import OnlineDPOLearner
from rlfleet.learner.policy import PolicyLearner
from rlfleet.learner.trainee import locate

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
sys.path.insert(0, str(FIXTURES))
from write_v1 import build_micro_model, groups, pairs, summary  # noqa: E402  the writer's own model and data

LEARNER = dict(device="cpu", learning_rate=1e-2, max_steps=10, micro_batch_size=4)
LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
BEMA = dict(update_freq=1, update_after=0, ref_model_update_freq=1)
LAYOUTS = {"grpo": ("grpo", "policy", "policy"), "grpo_lora": ("grpo", "policy", "policy"),
           "dpo": ("dpo", "learner/policy", "learner"), "online_dpo": ("online_dpo", "policy/policy", "policy")}


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    return build_micro_model(tmp_path_factory.mktemp("micro") / "model")


def make(name: str, model: Path):
    learner_cfg = LearnerConfig(**LEARNER)
    if name.startswith("grpo"):
        model_cfg = ModelConfig(name_or_path=str(model), lora=LORA if name == "grpo_lora" else None)
        return PolicyLearner(model_cfg, AlgorithmConfig(), learner_cfg, GenerationConfig(max_completion_length=6))
    dpo_cfg = DPOConfig(beta=0.5, max_length=32, bema=BEMAConfig(**BEMA))
    make_learner = DPOLearner if name == "dpo" else OnlineDPOLearner
    return make_learner(ModelConfig(name_or_path=str(model)), dpo_cfg, learner_cfg)


def held(name: str, learner) -> dict:
    """What ``write_v1.py`` recorded for layout ``name``, read from a learner of today."""
    counters = {"step": learner.step}
    if name != "dpo":
        counters["policy_version"] = learner.policy_version
    if name == "online_dpo":
        counters["skipped_steps"] = learner.objective.skipped_steps
    if name in ("dpo", "online_dpo"):
        counters["bema_updates"] = learner.bema.num_updates
    return summary(learner.model, learner.optimizer, **counters)


def train_on(name: str, learner, seed: int) -> dict:
    return learner.train_step(pairs(seed) if name == "dpo" else groups(seed))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_checkpoint_of_an_earlier_layout_loads_with_what_its_learner_held(name, micro_model):
    step_dir = ckpt.latest_checkpoint(FIXTURES / name)
    ckpt.verify(step_dir, learner_workers=1, lora=name == "grpo_lora")  # its manifest still holds
    kind, policy, state = LAYOUTS[name]
    layout = locate(step_dir)
    assert (layout.kind, layout.policy, layout.state) == (kind, step_dir / policy, step_dir / state)
    learner = make(name, micro_model)
    learner.load(step_dir)
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    assert held(name, learner) == expected


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_loaded_learner_trains_on_and_its_checkpoint_loads_back_the_same(name, micro_model, tmp_path):
    learner = make(name, micro_model)
    learner.load(ckpt.latest_checkpoint(FIXTURES / name))
    before = held(name, learner)
    metrics = train_on(name, learner, seed=7)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = held(name, learner)
    assert after["step"] == before["step"] + 1 and after["param_sum"] != before["param_sum"]
    learner.save(tmp_path / "step")
    assert locate(tmp_path / "step").kind == "v2"
    assert (tmp_path / "step" / "learner" / "learner.json").is_file()
    again = make(name, micro_model)
    again.load(tmp_path / "step")
    assert held(name, again) == after
    assert train_on(name, again, seed=8)["loss"] == train_on(name, learner, seed=8)["loss"]


def test_a_directory_without_a_learner_checkpoint_is_named(tmp_path):
    (tmp_path / "policy").mkdir()
    with pytest.raises(ValueError, match="holds no learner checkpoint"):
        locate(tmp_path)
