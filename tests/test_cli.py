"""`rlfleet config` prints the resolved config or the errors, without starting Ray."""

import json
import subprocess
import sys

from rlfleet.cli import main


def test_config_prints_resolved_json(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("learner:\n  max_steps: 3\n")
    assert main(["config", str(job), "generation.num_generations=4", "generation.generation_batch_size=8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["learner"]["max_steps"] == 3 and out["generation"]["num_generations"] == 4


def test_config_command_never_imports_ray(tmp_path):
    code = ("import sys; from rlfleet.cli import main; main(['config', 'learner.max_steps=2']); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("NO_RAY"), out.stdout[-500:] + out.stderr[-500:]


def test_config_errors_exit_nonzero_with_messages(capsys):
    assert main(["config", "learner.bogus=1"]) == 2
    assert "learner.bogus: unknown key" in capsys.readouterr().err
    assert main(["config", "replay.max_staleness=-1"]) == 2
    assert "replay.max_staleness: -1 is negative" in capsys.readouterr().err
