"""The config system: precedence, unknown keys, bounds, cross-field checks, shipped configs."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from rlfleet import config
from rlfleet.cli import main
from rlfleet.config import (AlgorithmBase, AlgorithmConfig, BEMAConfig, ClusterConfig, ConfigError, GenerationConfig,
                            GRPOConfig, OnlineDPOConfig, ReplayConfig, RLFleetConfig, dump_config, load_config,
                            parse_overrides)
from rlfleet.models import inflight_groups

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


# ---------------------------------------------------------------------------------------------- issue 31: config


@pytest.mark.parametrize("overrides, problem", [
    (["cluster.num_generators=-2"], "cluster.num_generators: -2 is less than 1; use 1 or more"),
    (["cluster.num_generators=0"], "cluster.num_generators: 0 is less than 1; use 1 or more"),
    (["cluster.num_generators={min: 0, max: 2}"], "cluster.num_generators.min: 0 is less than 1; use 1 or more"),
    (["cluster.num_generators=many"], "cluster.num_generators: Input should be a valid integer, unable to parse "
     "string as an integer; or a valid dictionary or instance of GeneratorRange; or 'auto' (got 'many')"),
    (["generation.top_k=-2"], "generation.top_k: -2 is less than -1; use -1 or more"),
])
def test_counts_are_bounded_with_one_line_naming_field_value_and_fix(overrides, problem):
    """One line per problem: the union's other members (`{min, max}`, 'auto') add none of their own."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.problems == [problem]


@pytest.mark.parametrize("section, values", [
    (ClusterConfig, {"num_generators": -2}),
    (GenerationConfig, {"num_generations": 1}),
    (AlgorithmConfig, {"num_remains_in_group": 1}),
    (OnlineDPOConfig, {"num_remains_in_group": 1}),
    (ReplayConfig, {"replay_buffer_size": -1}),
    (ReplayConfig, {"max_staleness": -1}),
    (BEMAConfig, {"update_freq": 0}),
])
def test_bounds_live_in_the_sections_schema(section, values):
    """The bound holds for the section alone, not only in the root's cross-field checks."""
    with pytest.raises(ValidationError):
        section(**values)


def test_rlfleet_config_names_a_negative_generator_count(capsys):
    assert main(["config", str(DEPLOY / "quickstart.yaml"), "cluster.num_generators=-2"]) == 2
    err = capsys.readouterr().err
    assert "cluster.num_generators: -2 is less than 1; use 1 or more" in err and "Traceback" not in err


def test_a_removed_option_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "cluster:\n  placement_strategy: PACK\n  num_generators: 2\n"))
    assert err.value.problems == [
        "cluster.placement_strategy: removed; it had no effect (each actor has a placement group of its own, so the "
        "job starts with the generators that fit and grows); delete it from the job file."]
    with pytest.raises(ConfigError, match="cluster.placement_strategy: removed"):
        load_config(None, ["cluster.placement_strategy=null"])


def test_removed_options_are_a_table(monkeypatch):
    """A later removal is one row, nested sections included."""
    monkeypatch.setitem(config.REMOVED_FIELDS, "dpo.bema.old_knob", "replaced by dpo.bema.new_knob")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dpo.bema.old_knob=3"])
    assert err.value.problems == ["dpo.bema.old_knob: removed; replaced by dpo.bema.new_knob."]


@pytest.mark.parametrize("overrides, problem", [
    (["cluster.generator_num_gpus=1", "generation.tensor_parallel_size=2"],
     "generation.tensor_parallel_size: 2 with cluster.generator_num_gpus: 1; a GPU generator's engine shards the "
     "model over tensor_parallel_size GPUs of its own (a share of one GPU runs tensor_parallel_size 1): set "
     "cluster.generator_num_gpus: 2 or generation.tensor_parallel_size: 1."),
    (["cluster.generator_num_gpus=2"], "generation.tensor_parallel_size: 1 with cluster.generator_num_gpus: 2;"),
    (["cluster.generator_num_gpus=0.5", "generation.tensor_parallel_size=2"],
     "(a share of one GPU runs tensor_parallel_size 1): set cluster.generator_num_gpus: 2."),
    (["algorithm.name=online_dpo", "dpo.batch_size=16"],
     "dpo.batch_size: 16 with algorithm.name online_dpo; a step trains on the pairs of learner.groups_per_step "
     "groups (dpo.batch_size is `rlfleet dpo`'s); set learner.groups_per_step and remove dpo.batch_size."),
    (["algorithm.name=online_dpo", "dpo.eval_steps=5"],
     "dpo.eval_steps: 5 with algorithm.name online_dpo; `rlfleet train` evaluates every logging.eval_steps "
     "(dpo.eval_steps is `rlfleet dpo`'s); set logging.eval_steps and remove dpo.eval_steps."),
])
def test_paired_knobs_that_contradict_are_refused(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert any(problem in p for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("overrides", [
    ["cluster.generator_num_gpus=2", "generation.tensor_parallel_size=2"],
    ["cluster.generator_num_gpus=0.5"],  # generators sharing a GPU
    ["generation.tensor_parallel_size=4"],  # CPU generators: the engine has no GPU to shard over
    ["algorithm.name=online_dpo", "learner.groups_per_step=8", "logging.eval_steps=5", "data.eval_split=test"],
    ["dpo.batch_size=16", "dpo.eval_steps=5"],  # `rlfleet dpo`'s own knobs
])
def test_paired_knobs_that_agree_pass(overrides):
    load_config(None, overrides)


def test_the_token_staleness_unit_and_its_refusals():
    """replay.staleness_unit: token loads with the continuous engine, each generator keeping one window of groups
    generating by default; with the batched engine, the reservoir's replays, online DPO or request order it is
    refused, each problem naming the field and what to use."""
    cfg = load_config(None, ["generation.engine=continuous", "replay.staleness_unit=token", "replay.max_staleness=2",
                             "learner.groups_per_step=3"])
    assert cfg.replay.staleness_unit == "token"
    assert inflight_groups(cfg) == (2 + 1) * 3  # the groups generating: one window by default
    cases = {
        "generation.engine: batched": [],
        "replay.zero_variance: 'replay'": ["generation.engine=continuous", "replay.zero_variance=replay",
                                           "replay.replay_buffer_size=8"],
        "algorithm.name: online_dpo": ["generation.engine=continuous", "algorithm.name=online_dpo"],
        "replay.consume_order: 'request'": ["generation.engine=continuous", "replay.consume_order=request"],
    }
    for problem, overrides in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, ["replay.staleness_unit=token", *overrides])
        assert any(problem in p and "staleness_unit: group" in p for p in err.value.problems), err.value.problems


def test_continuous_engine_fields_and_refusals():
    """generation.engine: continuous with its knobs loads, and so does it with multi-turn episodes and with LoRA;
    its knobs without it and a zero max_inflight_groups are refused, each naming the field."""
    cfg = config.config_from_dict({"generation": {"engine": "continuous", "max_inflight_groups": 16,
                                                  "kv_on_update": "recompute"}})
    assert (cfg.generation.engine, cfg.generation.max_inflight_groups, cfg.generation.kv_on_update) == (
        "continuous", 16, "recompute")
    cfg = config.config_from_dict({"generation": {"engine": "continuous", "max_turns": 2},
                                   "algorithm": {"environment": "scripted_user"}})
    assert (cfg.generation.engine, cfg.algorithm.environment) == ("continuous", "scripted_user")
    cfg = config.config_from_dict({"generation": {"engine": "continuous"}, "model": {"lora": {"r": 8}}})
    assert (cfg.generation.engine, cfg.model.lora.r) == ("continuous", 8)
    cases = {
        "generation.max_inflight_groups": {"generation": {"max_inflight_groups": 16}},
        "generation.kv_on_update": {"generation": {"kv_on_update": "recompute"}},
        "max_inflight_groups": {"generation": {"engine": "continuous", "max_inflight_groups": 0}},
    }
    for field, data in cases.items():
        with pytest.raises(ConfigError) as err:
            config.config_from_dict(data)
        assert field in str(err.value), (field, str(err.value))


def test_a_path_written_from_the_home_directory_is_expanded(monkeypatch, tmp_path):
    """output_dir, model.name_or_path, data.dataset and data.eval_dataset take '~/...' as a shell does; names that
    do not start with '~' (hub names, built-ins) are unchanged."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config.config_from_dict({"output_dir": "~/runs/a", "model": {"name_or_path": "~/models/m"},
                            "data": {"dataset": "~/d/train.jsonl", "eval_dataset": "~/d/eval.jsonl"}})
    assert (cfg.output_dir, cfg.model.name_or_path) == (f"{tmp_path}/runs/a", f"{tmp_path}/models/m")
    assert (cfg.data.dataset, cfg.data.eval_dataset) == (f"{tmp_path}/d/train.jsonl", f"{tmp_path}/d/eval.jsonl")
    assert config.config_from_dict({"model": {"name_or_path": "Qwen/Qwen3-0.6B"}}).model.name_or_path == "Qwen/Qwen3-0.6B"


# ---------------------------------------------------------------------------------------------- issue 31: algorithm


GRPO_ONLY = {"loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "delta", "sapo_temperature_pos",
             "sapo_temperature_neg", "beta", "num_iterations", "mask_truncated_completions", "importance_sampling_cap",
             "rollout_correction", "rollout_correction_level", "rollout_correction_min", "rollout_correction_max"}


def test_the_policy_gradient_knobs_are_grpos_only():
    """The shared base holds what the generators, the replay reservoir and the driver read under either algorithm;
    the policy-gradient knobs are GRPO's alone, and online DPO adds nothing (its knobs are the dpo section's)."""
    shared = set(AlgorithmBase.model_fields)
    assert set(GRPOConfig.model_fields) - shared == GRPO_ONLY
    assert set(OnlineDPOConfig.model_fields) == shared
    assert {"reward_funcs", "reward_weights", "reward_timeout_s", "reward_concurrency", "max_reward_error_frac",
            "num_remains_in_group", "group_filter_func", "environment", "environment_kwargs", "scale_rewards"} < shared


def test_each_algorithm_parses_and_grpo_is_the_default(tmp_path):
    assert type(RLFleetConfig().algorithm) is GRPOConfig and AlgorithmConfig is GRPOConfig
    nameless = load_config(write(tmp_path, "algorithm:\n  beta: 0.04\n  reward_funcs: [char_count_reward]\n"))
    assert type(nameless.algorithm) is GRPOConfig and nameless.algorithm.name == "grpo"
    assert (nameless.algorithm.beta, nameless.algorithm.reward_funcs) == (0.04, ["char_count_reward"])
    online = load_config(write(tmp_path, "algorithm:\n  name: online_dpo\n  reward_timeout_s: 5\n"
                                         "  num_remains_in_group: 4\n  group_filter_func: shortest\n"))
    assert type(online.algorithm) is OnlineDPOConfig and online.algorithm.reward_timeout_s == 5
    assert online.group_size == 4
    assert type(load_config(DEPLOY / "online_dpo.yaml").algorithm) is OnlineDPOConfig


def test_what_the_job_asks_of_each_algorithm():
    """The driver asks the variant, not its name: a reference model (memory estimate) and the KL series."""
    assert (GRPOConfig().keeps_reference, GRPOConfig().kl_coef) == (False, 0.0)
    assert (GRPOConfig(beta=0.04).keeps_reference, GRPOConfig(beta=0.04).kl_coef) == (True, 0.04)
    assert (OnlineDPOConfig().keeps_reference, OnlineDPOConfig().kl_coef) == (True, 0.0)


@pytest.mark.parametrize("field", sorted(GRPO_ONLY))
def test_a_grpo_field_under_online_dpo_is_refused_by_name(field):
    """Even at its default value: the key itself is not online DPO's."""
    value = GRPOConfig.model_fields[field].default
    with pytest.raises(ConfigError) as err:
        config.config_from_dict({"algorithm": {"name": "online_dpo", field: value}})
    assert err.value.problems == [
        f"algorithm.{field}: a field of algorithm.name grpo, not of online_dpo; remove it, or set algorithm.name: "
        "grpo (online DPO's own knobs are the dpo section's: dpo.beta, dpo.bema, dpo.pairs, dpo.min_reward_margin)"]


def test_online_dpo_refuses_an_environment_beside_grpo_fields():
    """The environment is a shared field that online DPO keeps None; refused in the same pass as GRPO's fields."""
    with pytest.raises(ConfigError) as err:
        load_config(DEPLOY / "multi_turn.yaml", ["algorithm.name=online_dpo"])
    problems = dict(p.split(": ", 1) for p in err.value.problems)
    assert sorted(problems) == ["algorithm.environment", "algorithm.loss_type"]
    assert problems["algorithm.environment"].startswith("'scripted_user' with algorithm.name online_dpo; multi-turn "
                                                        "episodes are trained with the policy-gradient losses only")


def test_rlfleet_config_names_the_grpo_field_of_an_online_dpo_job(capsys):
    assert main(["config", str(DEPLOY / "online_dpo.yaml"), "algorithm.loss_type=cispo"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.loss_type: a field of algorithm.name grpo, not of online_dpo" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides, problem", [
    (["algorithm.name=ppo"], "algorithm.name: 'ppo' is not one of 'grpo', 'online_dpo'"),
    (["algorithm.name=null"], "algorithm.name: None is not one of 'grpo', 'online_dpo'"),
    (["algorithm=online_dpo"], "algorithm: expected a section, e.g. {name: grpo, ...} (got 'online_dpo')"),
    (["algorithm.name=online_dpo", "algorithm.lose_type=dapo"],
     "algorithm.lose_type: unknown key (check the spelling; `rlfleet config` prints every known key)"),
])
def test_an_unknown_algorithm_is_one_line(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.problems == [problem]


def test_an_override_switches_the_algorithm(tmp_path):
    to_grpo = load_config(DEPLOY / "online_dpo.yaml", ["algorithm.name=grpo", "algorithm.beta=0.04"])
    assert type(to_grpo.algorithm) is GRPOConfig and to_grpo.algorithm.beta == 0.04
    shared = write(tmp_path, "algorithm:\n  reward_funcs: [char_count_reward]\n  reward_timeout_s: 5\n")
    to_dpo = load_config(shared, ["algorithm.name=online_dpo", "dpo.max_length=512"])
    assert type(to_dpo.algorithm) is OnlineDPOConfig
    assert (to_dpo.algorithm.reward_funcs, to_dpo.algorithm.reward_timeout_s) == (["char_count_reward"], 5)
    with pytest.raises(ConfigError) as err:  # the file's GRPO knobs do not follow the switch
        load_config(DEPLOY / "quickstart.yaml", ["algorithm.name=online_dpo", "dpo.max_length=512"])
    assert [p.split(":")[0] for p in err.value.problems] == ["algorithm.loss_type", "algorithm.beta"]


NAMED = ["online_dpo.yaml", "quickstart.yaml", "grpo_kl.yaml", "gfpo.yaml", "multi_turn.yaml", "cispo.yaml"]


@pytest.mark.parametrize("name", NAMED)
def test_the_saved_config_reloads_as_the_same_config(name, tmp_path):
    """A run writes dump_config(cfg) as output_dir/config.json (cluster/driver.py, cluster/dpo_job.py); given back to
    load_config it is the same config, the algorithm's variant included, and names its algorithm."""
    cfg = load_config(DEPLOY / name)
    saved = tmp_path / "config.json"
    saved.write_text(dump_config(cfg))
    again = load_config(saved)
    assert again == cfg and type(again.algorithm) is type(cfg.algorithm)
    assert '"name": "' + cfg.algorithm.name + '"' in saved.read_text()



def test_colocate_loads_with_every_algorithm_and_engine_and_refuses_what_it_cannot_run():
    """cluster.colocate with the GRPO family, online DPO, LoRA, both engines, a learner group (an engine per rank:
    the job's generators are its ranks); generators of their own, an engine over several GPUs or with most of one,
    the broadcast transport and learner threads other than the bundle's CPUs (vLLM's CPU attention checks the
    count it started with: a colocated job with 1 learner thread on 2 CPUs crashed the engine) are refused, each
    naming the field and the way out."""
    for data in ({}, {"algorithm": {"name": "online_dpo"}, "replay": {"zero_variance": "drop"}},
                 {"model": {"lora": {"r": 8}}}, {"generation": {"engine": "continuous"}}):
        cfg = config.config_from_dict({**data, "cluster": {"colocate": True}})
        assert cfg.cluster.colocate and (cfg.cluster.min_generators, cfg.cluster.max_generators) == (1, 1)
    for cluster in ({"learner_workers": 2}, {"learner_workers": 2, "num_generators": 2}):
        cfg = config.config_from_dict({"cluster": {"colocate": True, **cluster}})
        assert (cfg.cluster.min_generators, cfg.cluster.max_generators) == (2, 2)
    gpu = {"learner_num_gpus": 1}
    cases = {  # the problem, and the way out it names
        ("cluster.num_generators: 2 with cluster.colocate", "use num_generators: 1 (or remove it), or colocate: "
         "false"): {"cluster": {"num_generators": 2}},
        ("cluster.num_generators: 1 with cluster.colocate", "use num_generators: 2"):
            {"cluster": {"num_generators": 1, "learner_workers": 2}},
        ("cluster.num_generators: min=1 max=2 with cluster.colocate", "use num_generators: 1"):
            {"cluster": {"num_generators": {"min": 1, "max": 2}}},
        ("cluster.weight_transport: 'broadcast' with cluster.colocate", "remove weight_transport"):
            {"cluster": {"weight_transport": "broadcast"}},
        ("cluster.learner_threads: auto with cluster.colocate on CPU", "remove learner_threads"):
            {"cluster": {"learner_threads": "auto"}},
        ("cluster.learner_threads: 1 with cluster.colocate on CPU", "cluster.learner_num_cpus: 2"):
            {"cluster": {"learner_threads": 1, "learner_num_cpus": 2}},
        ("generation.tensor_parallel_size: 2 with cluster.colocate", "use 1"):
            {"generation": {"tensor_parallel_size": 2}},
        ("generation.gpu_memory_utilization: 0.9 with cluster.colocate on GPU", "TRL's colocated default is 0.3"):
            {"cluster": gpu},
    }
    for (problem, fix), data in cases.items():
        with pytest.raises(ConfigError) as err:
            config.config_from_dict({**data, "cluster": {"colocate": True, **data.get("cluster", {})}})
        assert problem in str(err.value) and fix in str(err.value), (problem, str(err.value))
        config.config_from_dict(data)  # each is valid without colocation
    cfg = config.config_from_dict({"cluster": {"colocate": True, **gpu}, "generation": {"gpu_memory_utilization": 0.3}})
    assert cfg.generation.gpu_memory_utilization == 0.3


def test_sleep_level_needs_a_colocated_batched_engine_and_level_two_the_full_weights():
    cfg = config.config_from_dict({"cluster": {"colocate": True}, "generation": {"sleep_level": 1},
                                   "model": {"lora": {"r": 8}}})
    assert cfg.generation.sleep_level == 1
    cases = {  # the problem, and the way out it names
        ("generation.sleep_level: 1 puts a colocated engine to sleep", "set cluster.colocate: true"):
            {"generation": {"sleep_level": 1}},
        ("generation.sleep_level: 2 with generation.engine: continuous", "use engine: batched, or sleep_level: 0"):
            {"generation": {"sleep_level": 2, "engine": "continuous"}, "cluster": {"colocate": True}},
        ("generation.sleep_level: 2 discards the engine's base weights", "use sleep_level: 1 with model.lora"):
            {"generation": {"sleep_level": 2}, "cluster": {"colocate": True}, "model": {"lora": {"r": 8}}},
    }
    for (problem, fix), data in cases.items():
        with pytest.raises(ConfigError) as err:
            config.config_from_dict(data)
        assert problem in str(err.value) and fix in str(err.value), (problem, str(err.value))
