"""The loggers of ``logging.report_to`` (TensorBoard, W&B offline), read back from the files they write; the Ray
series tables against what a run records and what the Grafana dashboard queries; the engine's log filter.

The files are read with the loggers' own formats, independently of the code that wrote them: TensorBoard's
EventAccumulator, and W&B's transaction log (LevelDB's log format around wandb's protobuf records).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path

import pytest

from rlfleet.cluster.metrics import (DPO_SERIES, EVAL_SERIES, ONLINE_DPO_SERIES, REWARD_FUNCTION_SERIES,
                                     RL_GENERATOR_SERIES, RL_SERIES, Reporters, dpo_series, logger_problems, rl_series, samples_markdown)
from rlfleet.config import LoggingConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file under ``logdir``, as TensorBoard shows them (after purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def tensorboard_texts(logdir: Path) -> dict[int, str]:
    """step -> the 'samples' text of that step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["tensors"] if t.startswith("samples")]
    return {e.step: e.tensor_proto.string_val[0].decode() for t in tags for e in acc.Tensors(t)}


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows (``wandb.log`` calls) of an offline W&B run, from its ``run-<id>.wandb`` transaction log: a
    7-byte header (":W&B", magic, version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte
    header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) around wandb's protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, rows = path.read_bytes(), []
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def record(step: int, reward: float) -> dict:
    return {"step": step, "reward/mean": reward, "loss": -reward, "policy_version": step, "ratio/min": float("nan")}


SAMPLES = [{"prompt_id": "p|1", "reward": 0.25, "completion": "a | b\nc"}, {"prompt_id": "p2", "reward": 1.0,
                                                                          "completion": "xyz"}]


def test_tensorboard_scalars_samples_and_resume(tmp_path):
    """Steps 1-5 logged, then a resume from the checkpoint at step 3 logs 4-6 again with other values: TensorBoard
    shows each step once, 4-6 from the resumed run (purge_step), as metrics.jsonl does."""
    cfg = LoggingConfig(report_to=["tensorboard"], log_every=2)
    first = Reporters(cfg, tmp_path, "run", {}, resume_step=None)
    for step in range(1, 6):
        first.log(record(step, step / 10), SAMPLES)
    first.close()
    resumed = Reporters(cfg, tmp_path, "run", {}, resume_step=3)
    for step in range(4, 7):
        resumed.log(record(step, step / 100), SAMPLES)
    resumed.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    expected = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.04, 5: 0.05, 6: 0.06}
    assert scalars["reward/mean"] == pytest.approx(expected, rel=1e-7)  # TensorBoard keeps float32
    assert scalars["loss"] == pytest.approx({s: -v for s, v in expected.items()}, rel=1e-7)
    assert scalars["policy_version"] == {s: float(s) for s in expected}
    assert "step" not in scalars and "ratio/min" not in scalars  # the x axis; NaN is not written
    texts = tensorboard_texts(tmp_path / "tensorboard")
    assert sorted(texts) == [2, 4, 6]  # every log_every steps
    assert texts[6].splitlines() == ["| prompt | reward | completion |", "|---|---|---|",
                                     "| p\\|1 | 0.250 | a \\| b c |", "| p2 | 1.000 | xyz |"]


def test_wandb_offline_writes_history_and_samples_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggingConfig(report_to=["wandb"], log_every=1)
    reporters = Reporters(cfg, tmp_path, "myrun", {"learner": {"learning_rate": 0.5}}, resume_step=None)
    for step in (1, 2, 3):
        reporters.log(record(step, step / 4), SAMPLES[:1])
    reporters.close()
    run_id = (tmp_path / "wandb-run-id").read_text()
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    rows = wandb_history(run_dir)
    assert [(r["_step"], r["reward/mean"], r["loss"]) for r in rows] == [(1, 0.25, -0.25), (2, 0.5, -0.5),
                                                                         (3, 0.75, -0.75)]
    tables = sorted((run_dir / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 3
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt_id", "reward", "completion"] and table["data"] == [["p|1", 0.25, "a | b\nc"]]
    # a resumed job continues the same W&B run
    Reporters(cfg, tmp_path, "myrun", {}, resume_step=3).close()
    assert (tmp_path / "wandb-run-id").read_text() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_wandb_online_without_a_key_is_refused_before_start(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    cfg = LoggingConfig(report_to=["tensorboard", "wandb"])
    (problem,) = logger_problems(cfg)
    assert problem.startswith("logging.report_to: wandb has no API key") and "WANDB_MODE=offline" in problem
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert logger_problems(cfg) == []
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert logger_problems(cfg) == []
    assert logger_problems(LoggingConfig(report_to=["tensorboard"])) == []


def test_a_logger_whose_package_is_missing_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(Exception) as err:
        load_config(ROOT / "deploy" / "quickstart.yaml", ["logging.report_to=[wandb]"])
    assert "logging.report_to" in str(err.value) and "pip install wandb" in str(err.value)


def test_markdown_cells_escape_pipes_and_newlines():
    assert samples_markdown([{"prompt_id": 1, "reward": -0.5, "completion": "|\n|\r\x0bx"}]).splitlines()[-1] == \
        "| 1 | -0.500 | \\| \\| x |"


def test_series_tables_and_the_grafana_dashboard_agree():
    """Every series the dashboard queries is one rlfleet exports (Prometheus adds Ray's `ray_` prefix), and every
    RL series has a panel. (test_job_submit runs each query against a real Prometheus.)"""
    board = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queried = {m.removeprefix("ray_") for e in exprs for m in re.findall(r"ray_rlfleet_\w+", e)}
    exported = (set(RL_SERIES) | set(RL_GENERATOR_SERIES) | set(DPO_SERIES) | set(ONLINE_DPO_SERIES) | set(EVAL_SERIES)
                | {name for name, _ in REWARD_FUNCTION_SERIES.values()})
    assert queried <= exported, queried - exported
    assert exported <= queried, exported - queried  # every series has a panel
    assert "rlfleet_kl" not in rl_series(0.0) and "rlfleet_kl" in rl_series(0.04)
    assert "rlfleet_dpo_eval_accuracy" not in dpo_series(False) and "rlfleet_dpo_eval_accuracy" in dpo_series(True)


def test_engine_log_filter_drops_only_the_known_benign_warnings(monkeypatch):
    from rlfleet.generation.engine import quiet_engine_logs

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    quiet_engine_logs("WARNING")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    emitter = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = emitter.level  # earlier tests' engines may have set vLLM's loggers' levels: only the filter is tested
    emitter.setLevel(logging.WARNING)
    emitter.addHandler(handler)
    try:
        emitter.warning("%s: Failed to load weights", "RotaryEmbedding")
        emitter.warning("%s: Failed to load weights", "Linear")  # another layer: a real problem, kept
        emitter.error("RotaryEmbedding: Failed to load weights")  # errors are never dropped
    finally:
        emitter.removeHandler(handler)
        emitter.setLevel(level)
    assert seen == ["Linear: Failed to load weights", "RotaryEmbedding: Failed to load weights"]


def test_readme_documents_every_series():
    readme = (ROOT / "README.md").read_text()
    for name in [*RL_SERIES, *RL_GENERATOR_SERIES, *DPO_SERIES, *ONLINE_DPO_SERIES, *EVAL_SERIES,
                 *(n for n, _ in REWARD_FUNCTION_SERIES.values())]:
        assert f"`ray_{name}`" in readme, name
