"""Faults and bad input: crashed actors, interrupted runs, corrupt checkpoints, wrong inputs (issue 8)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rlfleet.cli import main
from rlfleet.cluster.admission import REPLAY_DROPS
from rlfleet.cluster import checkpoint as ckpt
from rlfleet.config import load_config
from rlfleet.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def records_of(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(predicate, timeout_s: float, what: str):
    """Poll an observable condition until it holds or the deadline passes (bounded; not a sleep around a race)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# -- checkpoints ---------------------------------------------------------------------------------------------------


def write_checkpoint(out: Path, step: int) -> Path:
    staging = ckpt.staging_dir(out, step)
    (staging / "policy").mkdir()
    (staging / "policy" / "model.safetensors").write_bytes(os.urandom(4096))
    ckpt.write_state(staging, ({"fresh.rewards": np.arange(4, dtype=np.float32)}, {"counts": {"added": 4}}),
                     {"step": step, "stream": {"epoch": 0, "position": 8}})
    return ckpt.commit(staging, step, keep_last=2)


def test_checkpoint_round_trip_and_keep_last(tmp_path):
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-4", "step-6"]
    (arrays, meta), driver = ckpt.read_state(ckpt.latest_checkpoint(tmp_path))
    assert arrays["fresh.rewards"].tolist() == [0, 1, 2, 3] and meta == {"counts": {"added": 4}}
    assert driver["step"] == 6 and driver["stream"]["position"] == 8


def test_resume_hashes_each_file_once_until_one_changes(tmp_path, monkeypatch):
    """The job verifies the checkpoint before it starts and reads it afterwards: the files are hashed once; a file
    changed in between (same size, another byte, a later modification time) is hashed again and refused."""
    final = write_checkpoint(tmp_path, 2)
    hashed = []
    sha256 = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda path: hashed.append(path.name) or sha256(path))
    ckpt.verify(final, learner_workers=None)
    ckpt.read_state(final)
    assert sorted(hashed) == ["driver.json", "model.safetensors", "replay.json", "replay.npz"]
    weights = final / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    before = weights.stat().st_mtime_ns
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before + 10**9, before + 10**9))  # as a later write shows (not within the clock's tick)
    with pytest.raises(CheckpointError, match="corrupt: policy/model.safetensors does not match"):
        ckpt.read_state(final)


def test_truncated_file_is_refused(tmp_path):
    final = write_checkpoint(tmp_path, 2)
    weights = final / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt: policy/model.safetensors does not match"):
        ckpt.read_state(final)


def test_flipped_byte_is_refused(tmp_path):
    final = write_checkpoint(tmp_path, 2)
    data = bytearray((final / "replay.npz").read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    (final / "replay.npz").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: replay.npz"):
        ckpt.read_state(final)


def test_interrupted_write_never_looks_complete(tmp_path):
    write_checkpoint(tmp_path, 2)
    staging = ckpt.staging_dir(tmp_path, 4)  # a crash here: files written, never committed
    (staging / "driver.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-2"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.read_state(staging)


def test_incompatible_format_is_refused(tmp_path):
    final = write_checkpoint(tmp_path, 2)
    marker = json.loads((final / ckpt.MARKER).read_text())
    (final / ckpt.MARKER).write_text(json.dumps({**marker, "format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        ckpt.read_state(final)


def test_a_real_replay_state_loads_without_pickle(tmp_path):
    """The replay buffer's own state (fresh queue and reservoir, groups of different shapes with metadata) is
    written as numeric arrays plus JSON: np.load(allow_pickle=False) reads every array back (it raises on an object
    array), and the groups it rebuilds equal the ones that went in."""
    from rlfleet.config import ReplayConfig
    from rlfleet.replay.buffer import ReplayBuffer
    from tests.test_buffer import _group, _same

    buffer = ReplayBuffer(ReplayConfig(replay_buffer_size=4, zero_variance="replay", max_staleness=10), seed=0)
    groups = [_group("a", 1.0, n=2, t=3), _group("b", 2.0, n=3, t=5), _group("c", 0.0, n=2, t=1)]
    buffer.add(groups)
    buffer.sample(1, current_version=0)  # "a" is trained and offered to the reservoir
    staging = ckpt.staging_dir(tmp_path, 1)
    ckpt.write_state(staging, buffer.state_dict(), {"step": 1})
    with np.load(staging / "replay.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert all(a.dtype != object for a in arrays.values())
    restored = ReplayBuffer(ReplayConfig(replay_buffer_size=4, zero_variance="replay", max_staleness=10), seed=0)
    restored.load_state_dict(arrays, json.loads((staging / "replay.json").read_text()))
    assert [g.prompt_id for g in restored._fresh] == ["b", "c"]
    assert all(_same(x, y) for x, y in zip(restored._fresh, groups[1:]))
    assert [g.prompt_id for g in restored.reservoir] == ["a"]


# -- bad input: one clear message each, before any actor starts ----------------------------------------------------


def bad_reward(prompts, completions, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.parametrize("overrides, needle", [
    (["learner.lerning_rate=1"], "learner.lerning_rate: unknown key"),
    (["learner.max_steps=-3"], "learner.max_steps: Input should be greater than 0"),
    (["generation.num_generations=3"], "is not divisible by generation.num_generations (3)"),
    (["model.name_or_path=/nonexistent/model"], "model.name_or_path: '/nonexistent/model' is not a directory"),
    (["data.dataset=/nonexistent/prompts.jsonl"], "does not exist"),
    (["algorithm.reward_funcs=[no_such_module:f]"], "algorithm.reward_funcs[0]"),
    (["algorithm.reward_funcs=[tests.test_faults:missing]"], "algorithm.reward_funcs[0]"),
    (["algorithm.num_remains_in_group=2", "algorithm.group_filter_func=nope.mod:f"], "algorithm.group_filter_func"),
    (["model.max_model_len=40", "generation.max_completion_length=24"], "prompt 0 has"),
    (["generation.max_completion_length=600", "model.max_model_len=512"], "leaves no room for the prompt"),
])
def test_bad_input_fails_before_actors_with_the_field_and_fix(tmp_path, capsys, overrides, needle):
    code = main(["train", str(DEPLOY / "quickstart.yaml"), f"output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not (tmp_path / "checkpoints").exists()  # nothing started


@pytest.mark.parametrize("rows, needle", [
    ([], "is empty"),
    ([{"question": "no prompt column"}], "prompt"),
])
def test_bad_dataset_files(tmp_path, capsys, rows, needle):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", str(DEPLOY / "quickstart.yaml"), f"output_dir={tmp_path / 'run'}", f"data.dataset={data}",
                 "algorithm.reward_funcs=[tests.test_faults:bad_reward]"])
    err = capsys.readouterr().err
    assert code == 2 and "data.dataset" in err and needle in err, err


def test_resume_refuses_corrupt_checkpoint(tmp_path, capsys):
    """``rlfleet train --resume`` on a corrupt latest checkpoint: exit 2 with a message naming the file, before Ray
    or any actor starts."""
    import ray

    final = write_checkpoint(tmp_path, 2)
    (final / "policy" / "model.safetensors").write_bytes(b"")
    code = main(["train", str(DEPLOY / "quickstart.yaml"), f"output_dir={tmp_path}", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "corrupt: policy/model.safetensors" in err, err
    assert not ray.is_initialized()


def test_resume_with_another_learner_group_size_is_refused_before_ray(tmp_path, capsys):
    """A checkpoint whose optimizer state was sharded over 2 learner ranks, resumed with cluster.learner_workers=1:
    exit 2 naming both sizes and the fix, before Ray starts (the learner would otherwise fail after placement)."""
    import ray

    staging = ckpt.staging_dir(tmp_path, 2)
    (staging / "policy").mkdir()
    for r in range(2):
        (staging / "policy" / f"optimizer-rank{r}-of-2.safetensors").write_bytes(os.urandom(64))
    ckpt.write_state(staging, ({"fresh.rewards": np.arange(4, dtype=np.float32)}, {"counts": {}}), {"step": 2})
    final = ckpt.commit(staging, 2, keep_last=2)
    ckpt.verify(final, learner_workers=2)  # the size that wrote it resumes
    assert ckpt.learner_ranks(["policy/optimizer.safetensors"]) == 1 and ckpt.learner_ranks(["replay.json"]) is None
    code = main(["train", str(DEPLOY / "quickstart.yaml"), f"output_dir={tmp_path}", "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "learner group of 2 rank(s)" in err and "cluster.learner_workers=1" in err, err
    assert "resume with cluster.learner_workers=2" in err, err
    assert not ray.is_initialized()


# -- crashed actors and interrupted runs (real actors on a local Ray cluster) ---------------------------------------


def train_in_thread(cfg, train_dpo_job: bool = False, **train_kwargs):
    """``rlfleet train`` (or ``rlfleet dpo``) in a thread; returns the thread and a dict that receives its summary
    or its error. ``train_kwargs`` go to ``train`` (e.g. ``engine_factory``)."""
    from rlfleet.cluster.driver import train
    from rlfleet.cluster.dpo_job import train_dpo

    result: dict = {}

    def target():
        try:
            result["summary"] = train_dpo(cfg) if train_dpo_job else train(cfg, **train_kwargs)
        except BaseException as err:  # surfaced by the test after join
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def stop_and_join(thread: threading.Thread, timeout_s: float = 600) -> None:
    """End a run started with a huge max_steps: a stop request to its rlfleet-control actor (a final checkpoint
    follows), then wait for its thread."""
    import ray

    if thread.is_alive():
        try:
            ray.get(ray.get_actor("rlfleet-control").stop.remote(), timeout=60)
        except ValueError:  # the run ended (or never started its control actor): nothing to stop
            pass
    thread.join(timeout=timeout_s)


def run_killing(cfg, out, victim, after_records: int, dpo: bool = False) -> list[dict]:
    """Run ``cfg`` (a job with a huge max_steps) in a thread; once ``after_records`` records exist, kill the actor
    named ``victim`` (or ``victim()``'s name, looked up then) for good; once a record counts the recovery, end the
    run with a stop request (not a step count, which might race the kill) and return its records."""
    import ray

    thread, result = train_in_thread(cfg, train_dpo_job=dpo)
    try:
        wait_for(lambda: len(records_of(out)) >= after_records or not thread.is_alive(), 300,
                 f"{after_records} records before the kill")
        assert thread.is_alive(), result
        ray.kill(ray.get_actor(victim() if callable(victim) else victim), no_restart=True)
        wait_for(lambda: records_of(out)[-1].get("faults/recoveries") == 1 or not thread.is_alive(), 300,
                 "a step after the recovery")
        assert thread.is_alive(), result
    finally:
        stop_and_join(thread)
    assert "error" not in result, result.get("error")
    return records_of(out)


def run_restarting_generator(cfg, out) -> list[dict]:
    """Run ``cfg`` (a finite job) in a thread, kill rlfleet-generator-0 after two learner steps and let Ray
    restart it; return the records once the run ends."""
    import ray

    thread, result = train_in_thread(cfg)
    try:
        wait_for(lambda: len(records_of(out)) >= 2 or not thread.is_alive(), 300, "two learner steps")
        assert thread.is_alive(), result
        ray.kill(ray.get_actor("rlfleet-generator-0"), no_restart=False)
        thread.join(timeout=600)
    finally:  # a failed wait must not leave the run going into the next test
        stop_and_join(thread)
    assert "error" not in result, result.get("error")
    return records_of(out)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["batched", "continuous"])
def test_killed_generator_is_restarted_on_current_weights(ray_cluster, tmp_path, engine):
    """Synchronous mode (max_staleness 0) makes "current weights" checkable: a restarted generator that sampled
    with its initial weights would produce groups older than the bound, which the replay drops forever, and the
    run could not finish; with the driver's re-sync it finishes with ratios of exactly 1. A continuous engine's
    prompts in flight when it dies are re-issued the same way, except those whose groups its request had already
    handed to the replay actor (the fence): in either case every prompt the stream handed out is trained, queued
    or waiting to be re-issued, once, whatever point of a request the kill landed at."""
    cfg = load_config(DEPLOY / "dapo_sync.yaml", [f"output_dir={tmp_path}", "learner.max_steps=8",
                                                  "replay.zero_variance=keep", "logging.plot=false",
                                                  f"generation.engine={engine}"])
    records = run_restarting_generator(cfg, tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["faults/generator_restarts"] >= 1
    after = [r for r in records if r["faults/generator_restarts"] >= 1]
    assert after and all(abs(r["ratio/max"] - 1) < 1e-4 and abs(r["ratio/min"] - 1) < 1e-4 for r in after)
    assert sum(records[-1][k] for k in REPLAY_DROPS) == 0 and sum(r["gen/dropped_groups"] for r in records) == 0
    from tests.test_elastic import prompt_ledger

    ledger = prompt_ledger(cfg, tmp_path)
    assert len(ledger["trained"]) == 8 * cfg.learner.groups_per_step
    assert Counter(ledger["trained"]) + Counter(ledger["queued"]) + Counter(ledger["to_reissue"]) == \
        Counter(ledger["issued"])


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_killed_learner_recovers_from_checkpoint(ray_cluster, tmp_path):
    import ray

    cfg = load_config(DEPLOY / "grpo.yaml", [f"output_dir={tmp_path}", "learner.max_steps=8",
                                             "checkpoint.save_steps=2", "logging.plot=false"])
    thread, result = train_in_thread(cfg)
    try:
        wait_for(lambda: len(records_of(tmp_path)) >= 3 or not thread.is_alive(), 300, "three learner steps")
        assert thread.is_alive(), result
        ray.kill(ray.get_actor("rlfleet-learner"), no_restart=True)
        thread.join(timeout=600)
    finally:  # a failed wait must not leave the run going into the next test
        stop_and_join(thread)
    assert "error" not in result, result.get("error")
    records = records_of(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))  # rolled back to the checkpoint, then continued
    assert records[-1]["faults/recoveries"] == 1
    assert records[-1]["policy_version"] == 8


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_ctrl_c_writes_final_checkpoint_and_resume_continues(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rlfleet.cli", "train", str(DEPLOY / "gfpo.yaml"), f"output_dir={tmp_path}",
           "learner.max_steps=1000", "checkpoint.save_steps=1000", "logging.plot=false"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(records_of(tmp_path)) >= 3 or proc.poll() is not None, 300, "three learner steps")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    saved = ckpt.latest_checkpoint(tmp_path)
    driver = json.loads((saved / "driver.json").read_text())
    records = records_of(tmp_path)
    assert driver["step"] == records[-1]["step"] >= 3  # nothing trained is lost
    replay_meta = json.loads((saved / "replay.json").read_text())

    last = driver["step"]
    resume = [sys.executable, "-m", "rlfleet.cli", "train", str(DEPLOY / "gfpo.yaml"), f"output_dir={tmp_path}",
              f"learner.max_steps={last + 2}", "logging.plot=false", "--resume"]
    done = subprocess.run(resume, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = records_of(tmp_path)
    assert [r["step"] for r in after] == list(range(1, last + 3))
    assert after[last]["policy_version"] == last + 1
    # the buffer came back: its sample counter continues from the saved one by exactly one batch
    assert after[last]["replay/sampled"] == replay_meta["counts"]["sampled"] + 4
    # the data position came back: the resumed run continued the saved prompt order
    resumed_driver = json.loads((ckpt.latest_checkpoint(tmp_path) / "driver.json").read_text())
    assert (resumed_driver["stream"]["epoch"], resumed_driver["stream"]["position"]) >= (
        driver["stream"]["epoch"], driver["stream"]["position"])
