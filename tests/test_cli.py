"""`rlfleet config` prints the resolved config or the errors, without starting Ray."""

import json
import sys

from rlfleet.cli import main


def test_config_prints_resolved_json(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("learner:\n  max_steps: 3\n")
    assert main(["config", str(job), "generation.num_generations=4", "generation.generation_batch_size=8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["learner"]["max_steps"] == 3 and out["generation"]["num_generations"] == 4
    assert "ray" not in sys.modules  # validation never starts (or imports) Ray


def test_config_errors_exit_nonzero_with_messages(capsys):
    assert main(["config", "learner.bogus=1"]) == 2
    assert "learner.bogus: unknown key" in capsys.readouterr().err
    assert main(["config", "replay.max_staleness=-1"]) == 2
    assert "replay.max_staleness: -1 is negative" in capsys.readouterr().err
