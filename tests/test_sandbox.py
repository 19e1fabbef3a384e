"""The code sandbox (rlfleet/sandbox.py) and its reward, with hostile programs: each is contained, scores 0 and is
counted under its status; a correct program scores 1. These run the real sandbox (user, mount, PID and network
namespaces); where the platform refuses namespaces the module is skipped, saying why."""

import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile

import pytest

from rlfleet.code_task import PROBLEMS, code_rows
from rlfleet.config import DataConfig
from rlfleet.data import builtin_task, load_prompt_dataset
from rlfleet.rewards import CodeTestsReward, extract_code
from rlfleet.sandbox import NOBODY, Sandbox, SandboxLimits, SandboxUnavailable

LIMITS = SandboxLimits(timeout_s=2.5, cpu_s=1, memory_bytes=256 * 2**20, max_processes=16,
                       max_output_bytes=64 * 2**10)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    Sandbox(LIMITS).check()
except SandboxUnavailable as err:
    pytest.skip(f"no sandbox on this platform: {err}", allow_module_level=True)


def score(code: str, tests: str = "assert True", network: str = "none", limits: SandboxLimits = LIMITS
          ) -> tuple[float, dict, str]:
    """(reward, outcome counts, output) of one completion through a fresh reward object."""
    reward = CodeTestsReward("test_reward", network=network, limits=limits)
    (value,) = reward(None, [f"```python\n{code}\n```"], tests=[tests])
    output = reward.sandbox.run(code, tests).output if value == 0.0 else ""
    return value, dict(reward.outcomes), output


def test_a_correct_solution_scores_1_and_a_wrong_one_0():
    tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
    assert score("def add(a, b):\n    return a + b", tests)[:2] == (1.0, {"ok": 1})
    value, outcomes, output = score("def add(a, b):\n    return a - b", tests)
    assert (value, outcomes) == (0.0, {"failed": 1}) and "AssertionError" in output


def test_leaving_before_the_tests_run_fails():
    """Exit status 0 alone is not a pass: the runner's nonce is printed only after the tests."""
    for code in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"):
        assert score(code, "assert False")[:2] == (0.0, {"failed": 1})


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    assert score("while True:\n    pass")[:2] == (0.0, {"timeout": 1})


def test_a_program_that_closes_its_output_and_sleeps_hits_the_wall_clock():
    result = Sandbox(LIMITS).run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)")
    assert result.status == "timeout" and LIMITS.timeout_s <= result.seconds < LIMITS.timeout_s + 1


def sandbox_processes() -> list[str]:
    """PIDs of processes running as the sandbox's user (nobody) on this machine."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(line for line in f if line.startswith("Uid:")).split()[1]
        except (OSError, StopIteration):
            continue
        if int(uid) == NOBODY:
            pids.append(pid)
    return pids


@pytest.mark.skipif(os.geteuid() != 0, reason="counts processes of user nobody, which the sandbox uses as root")
def test_a_fork_bomb_is_contained_and_leaves_nothing_running():
    before = sandbox_processes()
    # bounded: the process limit refuses the 17th process (the error names it)
    value, outcomes, output = score("import os, time\nfor _ in range(100):\n    if os.fork() == 0:\n"
                                    "        time.sleep(30)\n        os._exit(0)")
    assert (value, outcomes) == (0.0, {"failed": 1}) and "BlockingIOError" in output
    # unbounded: every process forks forever, ignoring the refusals, until the wall clock kills the PID namespace
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert score(bomb)[:2] == (0.0, {"timeout": 1})
    assert sandbox_processes() == before  # the whole PID namespace died with its first process
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the machine can still start processes


def test_memory_bombs_are_refused():
    """The address-space limit ends them, whatever the wall clock allows: with LIMITS' 2.5 s, the interpreter's start
    on a loaded machine could run out the clock first (seen once), so these get 30 s."""
    limits = dataclasses.replace(LIMITS, timeout_s=30.0)
    assert score("x = bytearray(2**34)", limits=limits)[:2] == (0.0, {"memory": 1})
    assert score("xs = []\nwhile True:\n    xs.append(bytearray(2**20))", limits=limits)[:2] == (0.0, {"memory": 1})


@pytest.fixture
def open_dir():
    """A directory under /tmp that anyone may write: only the sandbox's read-only mounts stand in the way."""
    path = tempfile.mkdtemp()
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("where", ["project", "tmp", "dev_shm", "open_dir"])
def test_writes_outside_the_working_directory_fail(where, open_dir):
    path = {"project": os.path.join(REPO, "SANDBOX_WAS_HERE"), "tmp": "/tmp/rlfleet-sandbox-escape",
            "dev_shm": "/dev/shm/rlfleet-sandbox-escape", "open_dir": os.path.join(open_dir, "escape")}[where]
    value, outcomes, output = score(f"open({path!r}, 'w').write('x')")
    assert (value, outcomes) == (0.0, {"failed": 1}) and "Read-only file system" in output
    assert not os.path.exists(path)


def test_the_working_directory_is_private_writable_and_removed():
    code = "import os\nprint(sorted(os.listdir('.')))\nopen('scratch.txt', 'w').write('x' * 1000)\nprint(os.getcwd())"
    result = Sandbox(LIMITS).run(code, "assert open('scratch.txt').read() == 'x' * 1000")
    assert result.passed, result.output
    listing, workdir = result.output.splitlines()[-2:]
    assert listing == "['main.py', 'solution.py', 'tests.py']"
    assert not os.path.exists(workdir)
    size = LIMITS.max_file_bytes + 1
    too_big = f"with open('big', 'wb') as f:\n    f.write(b'x' * {size})"  # RLIMIT_FSIZE: a short write, or EFBIG
    assert score(too_big, f"import os\nassert os.path.getsize('big') == {size}")[:2] == (0.0, {"failed": 1})


def connect_program(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()"


def test_no_connection_reaches_the_host_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        value, outcomes, output = score(connect_program(server.getsockname()[1]))
        assert (value, outcomes) == (0.0, {"failed": 1}) and "unreachable" in output
        with pytest.raises(BlockingIOError):  # nothing in the accept queue: connect() returned before run() did
            server.accept()


def test_the_network_check_can_fail_when_network_is_allowed():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        assert score(connect_program(server.getsockname()[1]), network="allow")[:2] == (1.0, {"ok": 1})
        server.accept()[0].close()


def test_the_parents_environment_is_not_visible(monkeypatch):
    secret = "rlfleet-test-secret-5f2c"
    monkeypatch.setenv("RLFLEET_TEST_SECRET", secret)
    code = ("import os\nseen = [str(dict(os.environ))]\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()] + "
            f"['{os.getpid()}', '{os.getppid()}']:\n    try:\n        seen.append(open(f'/proc/{{pid}}/environ').read())"
            "\n    except OSError:\n        pass\nprint(seen)\nassert any('RLFLEET_TEST_SECRET' in s for s in seen)")
    value, outcomes, output = score(code)
    assert (value, outcomes) == (0.0, {"failed": 1})
    assert "PATH" in output and secret not in output  # it printed what it saw: PATH only


def test_megabytes_of_output_are_cut():
    value, outcomes, _ = score("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 100_000)")
    assert (value, outcomes) == (0.0, {"output_limit": 1})
    result = Sandbox(LIMITS).run("print('x' * 10_000_000)")
    assert result.status == "output_limit" and len(result.output) == LIMITS.excerpt_chars


def test_every_problem_of_the_code_task_passes_its_reference_and_fails_a_stub():
    reward = CodeTestsReward("test_reward")
    references = [f"```python\n{p.reference}```" for p in PROBLEMS]
    stubs = [f"def {p.name}(*args, **kwargs):\n    return None\n" for p in PROBLEMS]
    tests = [p.tests for p in PROBLEMS]
    assert reward(None, references, tests=tests) == [1.0] * len(PROBLEMS)
    assert reward(None, stubs, tests=tests) == [0.0] * len(PROBLEMS)
    assert dict(reward.outcomes) == {"ok": len(PROBLEMS), "failed": len(PROBLEMS)}
    assert len({p.name for p in PROBLEMS}) == len(PROBLEMS) >= 20


def test_the_builtin_code_task_loads_and_names_the_sandbox_reward():
    task = builtin_task("builtin:code")
    assert task.reward_funcs == ("rlfleet.rewards:code_tests_reward",)
    ds = load_prompt_dataset(DataConfig(dataset="builtin:code"), "train")
    assert set(ds.column_names) == {"prompt", "tests"} and len(ds) == len(PROBLEMS)
    assert sorted(r["tests"] for r in ds) == sorted(p.tests for p in PROBLEMS)  # each problem once per split
    import random
    assert code_rows(random.Random(0), 3) == code_rows(random.Random(0), 3)


def test_extract_code_takes_the_last_python_block_else_the_text():
    assert extract_code("intro\n```python\na = 1\n```\nthen\n```python\nb = 2\n```\n") == "b = 2\n"
    assert extract_code("```\nc = 3\n```") == "c = 3\n"
    assert extract_code("```py\nd = 4") == "d = 4"  # a truncated completion: up to its end
    assert extract_code("e = 5") == "e = 5"


def test_a_sandbox_that_cannot_start_is_refused_and_a_setup_failure_raises():
    broken = Sandbox(LIMITS, python="/nonexistent/python3")
    with pytest.raises(SandboxUnavailable, match="cannot run here"):
        broken.check()
    assert broken.run("pass").status == "error"
    CodeTestsReward("test_reward", limits=LIMITS).preflight()  # works here: no exception
    with pytest.raises(ValueError, match="SandboxLimits.cpu_s"):
        SandboxLimits(cpu_s=0)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_the_code_job_runs_end_to_end_and_counts_each_program(tmp_path):
    """deploy/code_tiny.yaml for 2 steps through the real CLI: the sandbox runs inside the reward worker inside the
    generation actor, and each step's record counts every program of the groups it reports (4 completions a group;
    the random tiny model writes no working code, so none passes)."""
    import json
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "rlfleet.cli", "train", os.path.join(REPO, "deploy", "code_tiny.yaml"),
                           f"output_dir={tmp_path}", "learner.max_steps=2", "logging.plot=false",
                           "replay.max_staleness=0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        counts = {k: v for k, v in r.items() if k.startswith("reward/code_tests_reward/count/")}
        assert sum(counts.values()) == 4 * r["gen/groups"] and "reward/code_tests_reward/count/ok" not in counts, r
        assert r["errors/reward"] == 0
    assert sum(r["gen/groups"] for r in records) > 0
