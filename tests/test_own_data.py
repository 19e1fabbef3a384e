"""Bring your own data and reward (issue 36): a user's module in the directory rlfleet is started from is found by
the driver and by every actor, through the real console script."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RLFLEET = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "rlfleet")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
ENV.pop("RAY_ADDRESS", None)
ENV.pop("PYTHONPATH", None)  # the user's shell: nothing set


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_a_reward_module_beside_the_job_is_found_without_pythonpath(tmp_path):
    """``my_length_reward.py`` in the directory the console script starts from: the driver resolves it (preflight)
    and the generator's reward worker calls it (its reward, 1 for every completion, is every trained step's reward).

    ``rewards/always_one/mean`` is over the groups generated between two steps, so a step whose window saw no new
    group has none: only the trained batch's ``reward/mean`` is in every record."""
    (tmp_path / "my_length_reward.py").write_text(
        "def always_one(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    done = subprocess.run([RLFLEET, "train", str(ROOT / "deploy" / "quickstart.yaml"), "output_dir=run",
                           "learner.max_steps=2", "logging.plot=false",
                           "algorithm.reward_funcs=[my_length_reward:always_one]"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in records] == [1.0, 1.0]
    generated = [r["rewards/always_one/mean"] for r in records if "rewards/always_one/mean" in r]
    assert generated == [1.0] * len(generated)


def walkthrough() -> str:
    """The bash block between README's walkthrough markers, as a user would copy it."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    return block.split("```bash\n", 1)[1].rsplit("```", 1)[0]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_readmes_walkthrough_runs_as_written_learns_and_evaluates_on_prompts_it_never_trained(tmp_path):
    """README's "Your own data and reward", run verbatim by bash from an empty directory with the environment's
    ``rlfleet`` on PATH: the trained reward rises (the mean of steps 51-60 above that of steps 1-10), and every
    evaluation scored the 4 rows of eval.jsonl, none of whose prompts is a training prompt, and says held-out."""
    env = {**ENV, "PATH": f"{Path(RLFLEET).parent}{os.pathsep}{ENV.get('PATH', '')}"}
    done = subprocess.run(["bash", "-e", "-c", walkthrough()], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    job = tmp_path / "shout"
    records = [json.loads(line) for line in (job / "runs" / "shout" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "reward/mean" in r}
    assert sorted(steps) == list(range(1, 61))
    first = sum(steps[s]["reward/mean"] for s in range(1, 11)) / 10
    last = sum(steps[s]["reward/mean"] for s in range(51, 61)) / 10
    assert last > first + 0.1, (first, last)

    def prompts(name: str) -> list[str]:
        return [json.loads(line)["prompt"] for line in (job / name).read_text().splitlines()]

    train, held_out = prompts("train.jsonl"), prompts("eval.jsonl")
    assert len(held_out) == 4 and not set(held_out) & set(train)
    evaluations = [r for r in records if "eval/reward/mean" in r]
    assert [r["step"] for r in evaluations] == [0, 20, 40, 60]
    assert all(r["eval/prompts"] == len(held_out) for r in evaluations)
    assert output.count(f"on {len(held_out)} held-out prompts") == 4 and "training prompts" not in output
    trained = {i for line in (job / "runs" / "shout" / "batches.jsonl").read_text().splitlines()
               for i in json.loads(line)["prompt_record_ids"]}
    assert trained <= {str(i) for i in range(len(train))}  # row numbers of train.jsonl
    assert "Warning: NUMA binding" not in output  # torch's notice at every engine start (issue 36, point 6)
