"""Held-out data however users keep it (issue 36): a second file (``data.eval_dataset``), slices of one file in the
datasets library's syntax, a directory of split files; evaluation on training prompts only with
``data.eval_on_train``, and then never called held-out. And ``rlfleet config`` checks what can be checked without
Ray (issue 36, deliverable 4). Through the command line (``rlfleet.cli.main`` in this process where Ray is not
started, the console script where a run is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet.cli import EXIT_BAD_INPUT, main
from rlfleet.cluster.evaluations import Evaluations
from rlfleet.cluster.preflight import preflight
from rlfleet.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "deploy" / "quickstart.yaml")
LOCAL = ["algorithm.reward_funcs=[target_length]", "logging.eval_steps=2"]  # a file's rows carry target_length


def write_prompts(path: Path, ids) -> Path:
    """Rows ``{"prompt": "reply in 4 tokens (id)", "prompt_id": id, "target_length": 4}``, as .jsonl or .csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"reply in 4 tokens ({i})", "prompt_id": i, "target_length": 4} for i in ids]
    if path.suffix == ".csv":
        path.write_text("prompt,prompt_id,target_length\n" + "".join(f"{r['prompt']},{i},4\n" for r, i in
                                                                       zip(rows, ids)))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_run(capsys, *overrides: str) -> tuple[int, str, str]:
    """``rlfleet config`` on the quickstart with ``overrides``, in this process: (exit code, stdout, stderr)."""
    code = main(["config", QUICKSTART, *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


def prompt_record_ids(*overrides: str) -> tuple[list[int], list[int]]:
    """The record ids (``prompt_id``) of the training and evaluation rows the preflight of ``rlfleet train`` loads."""
    train, held = preflight(load_config(QUICKSTART, list(overrides)))
    return [int(i) for i in train["prompt_id"]], [int(i) for i in held["prompt_id"]]


def test_a_second_file_is_the_evaluation_data(tmp_path, capsys):
    train = write_prompts(tmp_path / "train.jsonl", range(10))
    held = write_prompts(tmp_path / "held_out.jsonl", range(100, 105))
    overrides = [f"data.dataset={train}", f"data.eval_dataset={held}", *LOCAL]
    code, out, err = config_run(capsys, *overrides)
    assert code == 0, err
    assert json.loads(out)["data"]["eval_dataset"] == str(held)
    # eval_split: 'train', the whole file
    assert prompt_record_ids(*overrides) == (list(range(10)), list(range(100, 105)))


@pytest.mark.parametrize("train_split, eval_split, n_train", [("train[:90%]", "train[90%:]", 45),
                                                              ("train[:40]", "train[40:]", 40)])
def test_slices_of_one_file_split_its_prompts_in_two(tmp_path, capsys, train_split, eval_split, n_train):
    """50 rows: 'train[:90%]' is rows 0-44 and 'train[90%:]' rows 45-49; 'train[:40]' rows 0-39, 'train[40:]' the
    other 10. No prompt in both, none left out."""
    data = write_prompts(tmp_path / "prompts.jsonl", range(50))
    overrides = [f"data.dataset={data}", f"data.split={train_split}", f"data.eval_split={eval_split}", *LOCAL]
    code, _, err = config_run(capsys, *overrides)
    assert code == 0, err
    trained, evaluated = prompt_record_ids(*overrides)
    assert sorted(trained) == list(range(n_train)) and evaluated == list(range(n_train, 50))


def test_a_directory_holds_a_split_per_file(tmp_path, capsys):
    """``train.jsonl`` and ``test.csv`` in one directory: splits 'train' and 'test', whatever each file's format."""
    write_prompts(tmp_path / "data" / "train.jsonl", range(10))
    write_prompts(tmp_path / "data" / "test.csv", range(100, 103))
    overrides = [f"data.dataset={tmp_path / 'data'}/", "data.eval_split=test", *LOCAL]
    code, _, err = config_run(capsys, *overrides)
    assert code == 0, err
    assert prompt_record_ids(*overrides) == (list(range(10)), [100, 101, 102])


def test_a_split_the_directory_lacks_is_named_with_its_files(tmp_path, capsys):
    directory = tmp_path / "data"
    write_prompts(directory / "train.jsonl", range(10))
    write_prompts(directory / "test.csv", range(3))
    code, out, err = config_run(capsys, f"data.dataset={directory}", "data.eval_split=validation", *LOCAL)
    assert (code, out) == (EXIT_BAD_INPUT, "")
    assert err == ("rlfleet config: invalid config:\n  - data.eval_split: 'validation' cannot be loaded for "
                   f"evaluation: directory '{directory}' has no split 'validation'; its split files are test.csv, "
                   "train.jsonl (a split is named by its file's stem): use one of 'test', 'train'\n"), err


def test_a_single_file_has_one_split_to_slice(tmp_path, capsys):
    data = write_prompts(tmp_path / "prompts.jsonl", range(10))
    code, _, err = config_run(capsys, f"data.dataset={data}", "data.eval_split=test", *LOCAL)
    assert code == EXIT_BAD_INPUT
    assert err == ("rlfleet config: invalid config:\n  - data.eval_split: 'test' cannot be loaded for evaluation: a "
                   "single file holds one split, named 'train'; got 'test'. Slice it in the datasets library's syntax "
                   "('train[:90%]' to train on, 'train[90%:]' to evaluate on), give evaluation its own file "
                   "(data.eval_dataset), or use a directory of split files (train.jsonl, test.jsonl)\n"), err


def test_evaluating_on_training_prompts_is_refused_unless_asked_for(tmp_path, capsys):
    """The training file's 'train' split, or slices that share rows (80% of 50 = row 40 on, 90% = row 45), are
    training prompts: refused with the rows named, accepted with data.eval_on_train (then called training prompts,
    not held-out), which is refused in turn where nothing is shared."""
    data = write_prompts(tmp_path / "prompts.jsonl", range(50))
    code, _, err = config_run(capsys, f"data.dataset={data}", "data.eval_split=train", *LOCAL)
    assert code == EXIT_BAD_INPUT
    assert err == (
        "rlfleet config: invalid config:\n  - data.eval_split: 'train' reads training prompts (data.split 'train': "
        f"rows 0-49 of '{data}'), so it is not held out. To evaluate on held-out prompts, hold rows out in the "
        "datasets library's syntax (data.split: 'train[:90%]', data.eval_split: 'train[90%:]') or name other data "
        "with data.eval_dataset; to evaluate on training prompts knowingly, set data.eval_on_train: true (they are "
        "then reported as training prompts)\n"), err
    code, _, err = config_run(capsys, f"data.dataset={data}", "data.split=train[:90%]", "data.eval_split=train[80%:]",
                              *LOCAL)
    assert code == EXIT_BAD_INPUT and f"(data.split 'train[:90%]': rows 40-44 of '{data}')" in err, err
    code, _, err = config_run(capsys, f"data.dataset={data}", f"data.eval_dataset={data}", *LOCAL)  # the same file
    assert code == EXIT_BAD_INPUT and "data.eval_split: 'train' of data.eval_dataset" in err, err

    on_train = [f"data.dataset={data}", "data.eval_split=train", "data.eval_on_train=true", *LOCAL]
    code, _, err = config_run(capsys, *on_train)
    assert code == 0, err
    assert Evaluations(load_config(QUICKSTART, on_train), None).prompts == "training prompts"
    held_out = [f"data.dataset={data}", "data.split=train[:90%]", "data.eval_split=train[90%:]", *LOCAL]
    assert Evaluations(load_config(QUICKSTART, held_out), None).prompts == "held-out prompts"
    code, _, err = config_run(capsys, *held_out, "data.eval_on_train=true")
    assert code == EXIT_BAD_INPUT
    assert err == ("rlfleet config: invalid config:\n  - data.eval_on_train: true, but the evaluation split "
                   "('train[90%:]') shares no row with the training split (data.split 'train[:90%]'): it is held out; "
                   "remove data.eval_on_train\n"), err


def test_a_built_in_task_is_evaluated_on_its_test_split_not_its_training_split(capsys):
    assert config_run(capsys, "data.eval_split=test", "logging.eval_steps=5")[0] == 0
    code, _, err = config_run(capsys, "data.eval_split=train", "logging.eval_steps=5")
    assert code == EXIT_BAD_INPUT
    assert ("data.eval_split: 'train' reads training prompts (data.split 'train': all rows of 'builtin:target_length' "
            "split 'train'), so it is not held out. To evaluate on held-out prompts, use the held-out split "
            "(data.eval_split: test)") in err, err


def test_config_reports_a_missing_dataset_an_unimportable_reward_and_a_model_without_weights(tmp_path, capsys):
    """Every problem at once, exit 2, nothing on stdout, and no Ray started."""
    import ray

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    code, out, err = config_run(capsys, f"data.dataset={tmp_path / 'missing.jsonl'}",
                                "algorithm.reward_funcs=[rl36_no_such_module:score]", f"model.name_or_path={model}")
    assert (code, out) == (EXIT_BAD_INPUT, "")
    assert not ray.is_initialized()
    assert err == (
        "rlfleet config: invalid config:\n"
        f"  - model.name_or_path: directory '{model}' has config.json but no weights (no *.safetensors or *.bin "
        "file); copy the weights in (model.safetensors or pytorch_model.bin, or the shards and their index), or point "
        "at a complete model directory\n"
        f"  - data.dataset: file '{tmp_path / 'missing.jsonl'}' does not exist; check the path\n"
        "  - algorithm.reward_funcs[0]: 'rl36_no_such_module:score': module 'rl36_no_such_module' could not be "
        "imported (ModuleNotFoundError: No module named 'rl36_no_such_module'). Install the package or start rlfleet "
        "in the module's directory (or add that to PYTHONPATH; on a cluster of several nodes ship it with the job's "
        "working_dir), or fix the module name.\n"), err


def test_config_leaves_hub_names_to_the_job_and_downloads_nothing(capsys, monkeypatch):
    """deploy/qwen3-0.6b-grpo.yaml names a hub model and a hub dataset: checked otherwise (its reward module
    imports), listed as left to `rlfleet train`, and never fetched (any hub access fails this test)."""
    import datasets
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("rlfleet config fetched from the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    assert main(["config", str(ROOT / "deploy" / "qwen3-0.6b-grpo.yaml")]) == 0
    assert capsys.readouterr().err == ("rlfleet config: checked as for `rlfleet train`; not downloaded, left to it: "
                                       "model.name_or_path 'Qwen/Qwen3-0.6B', data.dataset 'openai/gsm8k'\n")
    assert main(["config", str(ROOT / "deploy" / "qwen3-0.6b-grpo.yaml"),
                 "algorithm.reward_funcs=[rlfleet.rewards:gsm8k_accuracy, rl36_nope:f]"]) == EXIT_BAD_INPUT
    assert "algorithm.reward_funcs[1]: 'rl36_nope:f': module 'rl36_nope' could not be imported" in \
        capsys.readouterr().err


def test_a_preference_job_is_checked_as_rlfleet_dpo_checks_it(tmp_path, capsys):
    assert main(["config", str(ROOT / "deploy" / "dpo_quickstart.yaml")]) == 0
    capsys.readouterr()
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "a", "chosen": "A", "rejected": "B"}) + "\n")
    code = main(["config", str(ROOT / "deploy" / "dpo_quickstart.yaml"), f"data.dataset={prefs}",
                 "data.eval_split=train"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and f"data.eval_split: 'train' reads training prompts (data.split 'train': rows " \
        f"0-0 of '{prefs}')" in err, err


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_an_evaluation_on_training_prompts_is_never_called_held_out(tmp_path):
    """`rlfleet train` with data.eval_on_train on a 6-prompt file: evaluations of steps 0 and 2, each on the 6
    training prompts, said so on the console."""
    data = write_prompts(tmp_path / "prompts.jsonl", range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "rlfleet.cli", "train", QUICKSTART, f"output_dir={tmp_path / 'run'}",
                           f"data.dataset={data}", "data.eval_split=train", "data.eval_on_train=true",
                           "learner.max_steps=2", "logging.plot=false", *LOCAL],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    evals = [line for line in done.stdout.splitlines() if "eval at step" in line]
    assert [line.split("eval at step ")[1].split(":")[0] for line in evals] == ["0", "2"], done.stdout
    assert all(line.endswith("on 6 training prompts") for line in evals), evals
    assert "held-out" not in done.stdout + done.stderr
