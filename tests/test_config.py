"""The config system: precedence, unknown keys, bounds, cross-field checks, shipped configs."""

from pathlib import Path

import pytest

from rlfleet.config import ConfigError, RLFleetConfig, load_config, parse_overrides

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_trl():
    cfg = RLFleetConfig()
    assert cfg.generation.num_generations == 8
    assert cfg.algorithm.loss_type == "dapo"
    assert cfg.algorithm.epsilon == 0.2 and cfg.algorithm.clip_high == 0.2
    assert cfg.algorithm.beta == 0.0
    assert cfg.algorithm.importance_sampling_level == "token"
    assert cfg.learner.learning_rate == 1e-6
    assert cfg.dpo.beta == 0.1
    b = cfg.dpo.bema
    assert (b.update_freq, b.ema_power, b.bias_power, b.lag, b.update_after, b.multiplier, b.min_ema_multiplier) == (
        400, 0.5, 0.2, 10.0, 0, 1.0, 0.0)


def test_precedence_defaults_file_overrides(tmp_path):
    p = write(tmp_path, "learner:\n  learning_rate: 0.001\n  max_steps: 7\ngeneration:\n  num_generations: 4\n"
                        "  generation_batch_size: 16\n")
    cfg = load_config(p, ["learner.lr=1e-5", "generation.num_generations=8"])
    assert cfg.learner.learning_rate == 1e-5  # override beats file (and `lr` is accepted as TRL-style alias)
    assert cfg.learner.max_steps == 7  # file beats default
    assert cfg.generation.num_generations == 8
    assert cfg.learner.micro_batch_size == 8  # default survives


def test_override_values_are_yaml_typed():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=null", "e=true", "f=x"]) == {
        "a": {"b": 1, "c": [1, 2]}, "d": None, "e": True, "f": "x"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["learner.lr"])


@pytest.mark.parametrize("overrides, needle", [
    (["learner.learnin_rate=1"], "learner.learnin_rate: unknown key"),
    (["generaton.num_generations=4"], "generaton: unknown key"),
    (["learner.max_steps=0"], "learner.max_steps: Input should be greater than 0 (got 0)"),
    (["algorithm.loss_type=ppo"], "algorithm.loss_type"),
])
def test_unknown_keys_and_bounds_fail_with_field_path(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


@pytest.mark.parametrize("overrides, needle", [
    (["generation.num_generations=3", "generation.generation_batch_size=4"],
     "generation.generation_batch_size: 4 is not divisible by generation.num_generations (3)"),
    (["generation.num_generations=1"], "generation.num_generations: 1 is less than 2"),
    (["algorithm.num_remains_in_group=8", "algorithm.group_filter_func=shortest"],
     "algorithm.num_remains_in_group: 8 must be less than generation.num_generations (8)"),
    (["algorithm.num_remains_in_group=1", "algorithm.group_filter_func=shortest"],
     "algorithm.num_remains_in_group: 1 is less than 2"),
    (["algorithm.num_remains_in_group=4"], "algorithm.group_filter_func: required"),
    (["algorithm.group_filter_func=shortest"], "algorithm.num_remains_in_group: must be set"),
    (["replay.replay_buffer_size=-1"], "replay.replay_buffer_size: -1 is negative"),
    (["replay.max_staleness=-2"], "replay.max_staleness: -2 is negative"),
    (["replay.zero_variance=replay"], "replay.zero_variance: 'replay' needs a reservoir"),
    (["dpo.bema.update_freq=0"], "dpo.bema.update_freq: 0 is less than 1"),
    (["algorithm.reward_funcs=[a, b]", "algorithm.reward_weights=[1.0]"], "algorithm.reward_weights: 1 weights"),
    (["cluster.learner_workers=2", "cluster.learner_num_gpus=0.5"],
     "cluster.learner_num_gpus: 0.5 with cluster.learner_workers=2; each rank of a learner group needs a GPU"),
    (["cluster.learner_workers=2", "learner.device=cuda"], "give each rank a GPU (learner_num_gpus: 1)"),
    (["cluster.learner_workers=0"], "cluster.learner_workers"),
    (["cluster.learner_workers=2", "cluster.learner_threads=auto"],
     "cluster.learner_threads: auto with cluster.learner_workers=2"),
    (["cluster.learner_threads=0"], "cluster.learner_threads"),
    (["cluster.weight_transport=broadcast", "cluster.generator_num_gpus=1"],
     "cluster.weight_transport: broadcast runs on CPU generators"),
    (["cluster.weight_transport=nccl"], "cluster.weight_transport"),
])
def test_cross_field_checks_name_field_value_and_fix(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["replay.max_staleness=-1", "dpo.bema.update_freq=0"])
    assert len(err.value.problems) == 2


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_valid_gfpo_config():
    cfg = load_config(None, ["algorithm.num_remains_in_group=4", "algorithm.group_filter_func=shortest"])
    assert cfg.group_size == 4


NOT_JOB_CONFIGS = {"runtime_env.yaml", "cluster-gpu.yaml", "kuberay-rayjob.yaml"}  # Ray / Kubernetes files


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*.yaml") if p.name not in NOT_JOB_CONFIGS),
                         ids=lambda p: p.name)
def test_every_shipped_job_config_parses(path):
    load_config(path)


def test_deploy_has_job_configs():
    assert (DEPLOY / "quickstart.yaml").is_file()
