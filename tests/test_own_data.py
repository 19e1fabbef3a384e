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
