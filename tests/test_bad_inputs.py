"""Inputs named, not traced (issue 33): a malformed dataset line, a missing column, a model directory without
weights and a user module that does not import each end in one message that names the file (and line), exit 2,
before Ray starts; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet.cli import EXIT_BAD_INPUT, main
from rlfleet.environments import make_environment

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "deploy" / "quickstart.yaml")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
ENV.pop("RAY_ADDRESS", None)


def rlfleet(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "PYTHONPATH": str(pythonpath)} if pythonpath else ENV
    return subprocess.run([sys.executable, "-m", "rlfleet.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def refused(capsys, *overrides: str) -> str:
    """``rlfleet train`` on the quickstart with ``overrides``, in this process: exit 2, no Ray started; its stderr."""
    import ray

    code = main(["train", QUICKSTART, *overrides])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert not ray.is_initialized()
    return err


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A directory on sys.path to write user modules into; writes ``name.py`` and returns its path."""
    directory = tmp_path / "user_modules"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))

    def write(name: str, source: str) -> Path:
        path = directory / f"{name}.py"
        path.write_text(source)
        importlib.invalidate_caches()
        return path

    return write


def test_a_half_written_jsonl_line_names_the_file_and_the_line(tmp_path):
    """Through the real command line: the last line cut mid-string; one message, no datasets/pyarrow traceback or
    log line."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "abc')
    done = rlfleet("train", QUICKSTART, f"output_dir={tmp_path / 'run'}", f"data.dataset={data}",
                   "algorithm.reward_funcs=[char_count]")
    assert done.returncode == EXIT_BAD_INPUT, done.stdout + done.stderr
    assert done.stderr.splitlines()[-2:] == [
        "rlfleet train: invalid config:",
        f"  - data.dataset: file '{data}': line 3 is not valid JSON (Unterminated string starting at: column 12): "
        "'{\"prompt\": \"abc'; fix or remove that line",
    ], done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "pyarrow" not in done.stderr, done.stderr


def test_a_jsonl_row_that_is_not_an_object_and_a_broken_json_document_are_located(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "one"}\n\n[1, 2]\n')
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", f"data.dataset={rows}",
                  "algorithm.reward_funcs=[char_count]")
    assert f"  - data.dataset: file '{rows}': line 3 is a JSON list, not an object (one row per line): '[1, 2]'; " \
           "fix or remove that line\n" in err, err
    document = tmp_path / "rows.json"
    document.write_text('[{"prompt": "one"},\n {"prompt": "two"}\n')  # the closing bracket is missing
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", f"data.dataset={document}",
                  "algorithm.reward_funcs=[char_count]")
    assert f"  - data.dataset: file '{document}': not valid JSON at line 3, column 1 (Expecting ',' delimiter); fix " \
           "the file\n" in err, err


def test_a_parquet_file_that_cannot_be_read_names_the_file_and_the_reason(tmp_path, capsys):
    data = tmp_path / "prompts.parquet"
    data.write_text("not a parquet file\n")
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", f"data.dataset={data}",
                  "algorithm.reward_funcs=[char_count]")
    assert f"  - data.dataset: file '{data}' cannot be read as parquet: ArrowInvalid: Parquet magic bytes not found " \
           "in footer. Either the file is corrupted or this is not a parquet file.\n" in err, err


def test_a_missing_prompt_column_lists_the_columns_present(tmp_path, capsys):
    data = tmp_path / "questions.jsonl"
    data.write_text('{"question": "2+2?", "answer": "4"}\n')
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", f"data.dataset={data}",
                  "algorithm.reward_funcs=[char_count]")
    assert f"  - data.dataset: '{data}' has no 'prompt' column (columns: ['question', 'answer']); rename one with " \
           "data.column_mapping, e.g. {question: prompt}\n" in err, err


def test_a_model_directory_without_weights_is_refused_before_ray_starts(tmp_path, capsys, tiny_model_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model, ignore=shutil.ignore_patterns("*.safetensors"))
    assert (model / "config.json").is_file() and not list(model.glob("*.safetensors"))
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model}")
    assert err == (f"rlfleet train: invalid config:\n  - model.name_or_path: directory '{model}' has config.json but "
                   "no weights (no *.safetensors or *.bin file); copy the weights in (model.safetensors or "
                   "pytorch_model.bin, or the shards and their index), or point at a complete model directory\n"), err


def test_a_sharded_model_missing_a_shard_names_it(tmp_path, capsys, tiny_model_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model}")
    assert f"  - model.name_or_path: directory '{model}' lacks 1 of the 2 weight shard(s) that " \
           "model.safetensors.index.json names (model-00002-of-00002.safetensors); copy the missing files in\n" in err


def test_a_reward_module_with_a_syntax_error_names_its_file_and_line(tmp_path, capsys, user_modules):
    path = user_modules("rl33_syntax_reward", "import math\n\ndef score(prompts, completions:\n    return []\n")
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", "algorithm.reward_funcs=[rl33_syntax_reward:score]")
    assert err == ("rlfleet train: invalid config:\n  - algorithm.reward_funcs[0]: 'rl33_syntax_reward:score': module "
                   f"'rl33_syntax_reward' does not compile ({path}, line 3): SyntaxError: '(' was never closed: "
                   "'def score(prompts, completions:'. Fix the module.\n"), err


def test_a_reward_module_that_raises_at_import_names_the_line_in_its_file(tmp_path, capsys, user_modules):
    """The error is raised inside a helper the module calls at import: the innermost line in the module's file."""
    path = user_modules("rl33_raising_reward", 'import json\n\ndef load():\n    return json.loads("{}")["table"]\n\n'
                                               "TABLE = load()\n\ndef score(prompts, completions, **kw):\n"
                                               "    return [0.0] * len(completions)\n")
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", "algorithm.reward_funcs=[rl33_raising_reward:score]")
    assert err == ("rlfleet train: invalid config:\n  - algorithm.reward_funcs[0]: 'rl33_raising_reward:score': module "
                   f"'rl33_raising_reward' raised while it was imported ({path}, line 4: 'return "
                   "json.loads(\"{}\")[\"table\"]'): KeyError: 'table'. Fix the module (or install what it imports); "
                   "--debug shows the traceback.\n"), err


def test_a_group_filter_importing_a_missing_package_names_its_import_line(tmp_path, capsys, user_modules):
    path = user_modules("rl33_filter", "import os\nimport rl33_no_such_package\n")
    err = refused(capsys, f"output_dir={tmp_path / 'run'}", "algorithm.group_filter_func=rl33_filter:keep",
                  "algorithm.num_remains_in_group=4")
    assert ("  - algorithm.group_filter_func: 'rl33_filter:keep': module 'rl33_filter' raised while it was imported "
            f"({path}, line 2: 'import rl33_no_such_package'): ModuleNotFoundError: No module named "
            "'rl33_no_such_package'. Fix the module (or install what it imports); --debug shows the "
            "traceback.\n") in err


def test_a_missing_module_still_says_to_install_it():
    with pytest.raises(ValueError) as info:
        make_environment("rl33_no_such_environment:Env", {})
    assert str(info.value) == (
        "algorithm.environment: 'rl33_no_such_environment:Env': module 'rl33_no_such_environment' could not be "
        "imported (ModuleNotFoundError: No module named 'rl33_no_such_environment'). Install the package or start "
        "rlfleet in the module's directory (or add that to PYTHONPATH; on a cluster of several nodes ship it with the "
        "job's working_dir), or fix the module name.")


def test_an_environment_module_that_raises_at_import_is_named(user_modules):
    path = user_modules("rl33_environment", "class Env:\n    pass\n\nraise RuntimeError('no tool server configured')\n")
    with pytest.raises(ValueError) as info:
        make_environment("rl33_environment:Env", {})
    assert str(info.value) == (
        f"algorithm.environment: 'rl33_environment:Env': module 'rl33_environment' raised while it was imported "
        f"({path}, line 4: \"raise RuntimeError('no tool server configured')\"): RuntimeError: no tool server "
        "configured. Fix the module (or install what it imports); --debug shows the traceback.")


def test_an_environment_whose_constructor_raises_is_named(user_modules):
    user_modules("rl33_env_ctor", "class Env:\n    def __init__(self, **kwargs):\n        raise ConnectionError("
                 "'tool server unreachable')\n")
    with pytest.raises(ValueError) as info:
        make_environment("rl33_env_ctor:Env", {"url": "x"})
    assert str(info.value) == (
        "algorithm.environment: 'rl33_env_ctor:Env' failed while it was built with algorithm.environment_kwargs="
        "{'url': 'x'}: ConnectionError: tool server unreachable. Fix the class or its keyword arguments; --debug "
        "shows the traceback.")


def test_debug_shows_the_traceback_down_to_the_syntax_error(tmp_path):
    """Without --debug one message (exit 2); with it the traceback, the SyntaxError included as the cause."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "rl33_debug_reward.py").write_text("def score(prompts, completions:\n    return []\n")
    args = ("train", QUICKSTART, f"output_dir={tmp_path / 'run'}", "algorithm.reward_funcs=[rl33_debug_reward:score]")
    plain = rlfleet(*args, pythonpath=modules)
    assert plain.returncode == EXIT_BAD_INPUT and "Traceback" not in plain.stderr, plain.stderr
    debug = rlfleet(*args, "--debug", pythonpath=modules)
    assert debug.returncode == 1, debug.stderr  # an uncaught exception
    assert "Traceback (most recent call last)" in debug.stderr
    assert f'File "{modules / "rl33_debug_reward.py"}", line 1' in debug.stderr  # the SyntaxError's own frame
    assert "SyntaxError: '(' was never closed" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-2] == "rlfleet.config.ConfigError: invalid config:", debug.stderr


def test_an_unknown_tiny_model_size_is_one_line(tmp_path, capsys):
    assert main(["tiny-model", "--size", "bogus", str(tmp_path / "m")]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == ("rlfleet tiny-model: --size: unknown built-in model 'bogus'; choose one of "
                                       "['small', 'tiny', 'tiny-lora']\n")
