"""Online DPO (``algorithm.name: online_dpo``): pairs from scored groups, the learner built on them, its config
checks; end to end on the tiny model with real engines (reward rises; evaluation while training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlfleet.config import BEMAConfig, ConfigError, DPOConfig, LearnerConfig, ModelConfig, load_config
from rlfleet.dpo.data import PreferencePair
from rlfleet.dpo.learner import DPOLearner
from rlfleet.dpo.online import OnlineDPOLearner, group_pairs, preference_pairs
from rlfleet.types import Group
from tests.test_dpo import assert_same, params

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def group(rewards, lengths=None, prompt=(5, 6, 7), seed: int = 0, prompt_id: str = "p") -> Group:
    """A group of ``len(rewards)`` random completions of ``lengths`` tokens, right-padded with 0 to the longest."""
    rng = np.random.default_rng(seed)
    n = len(rewards)
    lengths = np.asarray(lengths if lengths is not None else [3 + i for i in range(n)], dtype=np.int32)
    ids = np.zeros((n, lengths.max()), dtype=np.int32)
    for j, L in enumerate(lengths):
        ids[j, :L] = rng.integers(1, 256, L)
    return Group(prompt_id=prompt_id, prompt_token_ids=np.asarray(prompt, dtype=np.int32), completion_ids=ids,
                 completion_lengths=lengths, behaviour_logprobs=np.zeros(ids.shape, dtype=np.float32),
                 rewards=np.asarray(rewards, dtype=np.float32), advantages=np.zeros(n, dtype=np.float32),
                 truncated=np.zeros(n, dtype=bool), policy_version=0, reward_std=0.0)


# ---------------------------------------------------------------------------------------------- pairs


def test_best_worst_takes_the_first_of_equals_and_needs_more_than_the_margin():
    rewards = np.array([0.25, 0.75, 0.75, 0.0])  # best: index 1 (the first 0.75), worst: index 3
    assert group_pairs(rewards, "best_worst", 0.0) == [(1, 3)]
    assert group_pairs(rewards, "best_worst", 0.5) == [(1, 3)]  # 0.75 > 0.5
    assert group_pairs(rewards, "best_worst", 0.75) == []  # the margin must be exceeded, not met
    assert group_pairs(np.array([0.5, 0.5, 0.5]), "best_worst", 0.0) == []  # no variance: no pair
    assert group_pairs(np.array([0.0, 1.0, 1.0, 0.0]), "best_worst", 0.0) == [(1, 0)]


def test_all_pairs_in_index_order_above_the_margin():
    rewards = np.array([0.0, 1.0, 0.5])
    assert group_pairs(rewards, "all", 0.0) == [(1, 0), (1, 2), (2, 0)]
    assert group_pairs(rewards, "all", 0.5) == [(1, 0)]  # 1 - 0.5 and 0.5 - 0 do not exceed 0.5
    assert group_pairs(np.array([0.5, 0.5]), "all", 0.0) == []


def test_unscored_completions_are_in_no_pair():
    nan = math.nan
    assert group_pairs(np.array([nan, 1.0, 0.0, nan]), "best_worst", 0.0) == [(1, 2)]
    assert group_pairs(np.array([nan, 1.0, 0.0, nan]), "all", 0.0) == [(1, 2)]
    assert group_pairs(np.array([nan, 1.0, nan]), "best_worst", 0.0) == []  # one scored completion
    assert group_pairs(np.array([nan, nan]), "all", 0.0) == []


def test_preference_pairs_carry_the_engine_tokens_without_padding():
    """Group a: rewards [0.5, 1.0, 0.0] -> chosen row 1 (4 tokens), rejected row 2 (5 tokens), margin 1.0.
    Group b: all equal -> no pair, counted. Group c: rewards [0.25, 0.75] -> (1, 0), margin 0.5."""
    a = group([0.5, 1.0, 0.0], lengths=[3, 4, 5], prompt=(1, 2), seed=1)
    b = group([0.5, 0.5], prompt=(3,), seed=2)
    c = group([0.25, 0.75], lengths=[2, 6], prompt=(4, 5, 6), seed=3)
    pairs, margins, unpaired = preference_pairs([a, b, c])
    assert unpaired == 1 and margins == [1.0, 0.5]
    assert pairs == [
        PreferencePair([1, 2], a.completion_ids[1, :4].tolist(), a.completion_ids[2, :5].tolist()),
        PreferencePair([4, 5, 6], c.completion_ids[1, :6].tolist(), c.completion_ids[0, :2].tolist()),
    ]
    assert all(0 not in p.chosen_ids + p.rejected_ids for p in pairs)  # padding (0) never enters a pair
    pairs, margins, unpaired = preference_pairs([a], "all")
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [
        (a.completion_ids[0, :3].tolist(), a.completion_ids[2, :5].tolist()),  # 0.5 > 0.0
        (a.completion_ids[1, :4].tolist(), a.completion_ids[0, :3].tolist()),  # 1.0 > 0.5
        (a.completion_ids[1, :4].tolist(), a.completion_ids[2, :5].tolist()),  # 1.0 > 0.0
    ]
    assert margins == [0.5, 0.5, 1.0] and unpaired == 0


# ---------------------------------------------------------------------------------------------- the learner


def configs(pairs: str = "best_worst", **learner):
    dpo = DPOConfig(beta=0.5, max_length=64, pairs=pairs, bema=BEMAConfig(update_freq=1, ref_model_update_freq=1))
    return ModelConfig(), dpo, LearnerConfig(**{"device": "cpu", "learning_rate": 1e-3, "max_steps": 10,
                                                "micro_batch_size": 4, **learner})


def batch(seed: int) -> list[Group]:
    return [group([0.1 * ((seed + 3 * i + j) % 5) for j in range(4)], prompt=(10 + i, 20 + seed), seed=seed * 10 + i,
                  prompt_id=f"{seed}-{i}") for i in range(3)]


def test_a_step_is_the_dpo_step_on_the_groups_pairs():
    """Online DPO on groups = the DPO learner on the pairs formed by hand (best: highest reward, first of equals;
    worst: lowest), step for step, reference and BEMA included."""
    online, offline = OnlineDPOLearner(*configs()), DPOLearner(*configs())
    for seed in range(3):
        groups = batch(seed)
        by_hand = []
        for g in groups:
            r = g.rewards.tolist()
            best, worst = r.index(max(r)), r.index(min(r))
            by_hand.append(PreferencePair(g.prompt_token_ids.tolist(),
                                          g.completion_ids[best, :g.completion_lengths[best]].tolist(),
                                          g.completion_ids[worst, :g.completion_lengths[worst]].tolist()))
        metrics = online.train_step(groups)
        expected = offline.train_step(by_hand)
        assert metrics["loss"] == expected["loss"] and metrics["dpo/pairs"] == 3
        assert metrics["policy_version"] == seed + 1 and metrics["dpo/optimizer_steps"] == seed + 1
        assert metrics["reward/mean"] == pytest.approx(np.mean([g.rewards for g in groups]))
        # DPO's own metrics under dpo/ (a reward function may be called "chosen": rewards/chosen/mean)
        for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "policy_accuracy"):
            assert metrics[f"dpo/{key}"] == expected[key] and key not in metrics, key
    assert_same(params(online.model), params(offline.model))
    assert_same(params(online.ref_model), params(offline.ref_model))
    assert online.state_dict().keys() == offline.model.state_dict().keys()


def test_a_step_without_pairs_changes_nothing_but_the_version():
    learner = OnlineDPOLearner(*configs())
    before = params(learner.model)
    metrics = learner.train_step([group([0.5] * 4, seed=1), group([0.0] * 4, seed=2)])
    assert_same(params(learner.model), before)
    assert math.isnan(metrics["loss"]) and metrics["dpo/pairs"] == 0 and metrics["dpo/unpaired_groups"] == 2
    assert metrics["policy_version"] == 1 and metrics["dpo/skipped_steps"] == 1 and metrics["dpo/optimizer_steps"] == 0
    assert learner.step == 0  # BEMA's clock counts optimizer steps only


def test_resume_continues_exactly(tmp_path):
    straight, first = OnlineDPOLearner(*configs()), OnlineDPOLearner(*configs())
    steps = [batch(s) for s in range(4)] + [[group([0.5] * 4)]]  # the last has no pair
    for groups in steps[:2]:
        straight.train_step(groups)
        first.train_step(groups)
    first.save(tmp_path / "ckpt")
    resumed = OnlineDPOLearner(*configs())
    resumed.load(tmp_path / "ckpt")
    assert resumed.policy_version == 2
    for groups in steps[2:]:
        a, b = straight.train_step(groups), resumed.train_step(groups)
        assert {k: v for k, v in a.items() if k != "time/step_s"} == pytest.approx(
            {k: v for k, v in b.items() if k != "time/step_s"}, nan_ok=True)
    assert_same(params(resumed.model), params(straight.model))
    assert resumed.policy_version == 5 and resumed.skipped_steps == 1


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, field", [
    ("algorithm.beta=0.04", "algorithm.beta"),
    ("algorithm.num_iterations=2", "algorithm.num_iterations"),
    ("dpo.max_length=128", "dpo.max_length"),
])
def test_online_dpo_refuses_fields_it_has_no_use_for(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(DEPLOY / "online_dpo.yaml", [override])
    assert any(p.startswith(field) for p in err.value.problems), err.value.problems


def test_online_dpo_refuses_an_environment():
    with pytest.raises(ConfigError) as err:
        load_config(DEPLOY / "multi_turn.yaml", ["algorithm.name=online_dpo"])
    assert any(p.startswith("algorithm.environment") and "online_dpo" in p for p in err.value.problems)


def test_the_shipped_job_is_valid():
    cfg = load_config(DEPLOY / "online_dpo.yaml")
    assert cfg.algorithm.name == "online_dpo" and cfg.dpo.bema is not None and cfg.logging.eval_steps


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_online_dpo_job_raises_the_reward(ray_cluster, tmp_path):
    """deploy/online_dpo.yaml on builtin:target_length with real engines, synchronous (max_staleness 0: which
    weights sample which prompts does not depend on timing, so the run is the same on a loaded machine): the batch
    reward rises (measured: 0.454 over steps 1-20, 0.633 over steps 131-150; asynchronous runs of the shipped job
    reached 0.55-0.66), every step trains on its groups' pairs with the BEMA reference refreshed every 10 steps, and
    the BEMA weights are written at the end."""
    from rlfleet.cluster.driver import train

    cfg = load_config(DEPLOY / "online_dpo.yaml", [f"output_dir={tmp_path / 'job'}", "logging.plot=false",
                                                   "logging.eval_steps=null", "data.eval_split=null",
                                                   "replay.max_staleness=0"])
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 151))
    assert all(r["dpo/pairs"] == 4 and r["staleness/max"] == 0 for r in records)  # zero-variance groups: dropped
    assert [r["step"] for r in records if r["bema/ref_updated"]] == list(range(10, 151, 10))
    first = np.mean([r["reward/mean"] for r in records[:20]])
    last = np.mean([r["reward/mean"] for r in records[-20:]])
    assert last > first + 0.1, (first, last)
    assert (Path(summary["bema"]) / "model.safetensors").is_file()
