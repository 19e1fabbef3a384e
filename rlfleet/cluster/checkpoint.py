"""Checkpoints: ``output_dir/checkpoints/step-N/``, written atomically, loaded without unpickling code.

Layout of one checkpoint::

    step-N/
      policy/          the policy: Hugging Face model (or LoRA adapter) + tokenizer
      learner/         the learner's state: optimizer, scheduler, reference, BEMA, learner.json
                       (:mod:`rlfleet.learner.trainee`; the layouts before it still load: ``trainee.locate``)
      replay.npz       the replay buffer's arrays (numeric only; np.load(allow_pickle=False))
      replay.json      the replay buffer's metadata
      driver.json      step, policy version, prompt cursor, RNG state
      COMPLETE         written last: the format version and every file's size and SHA-256; a directory without
                       it is not a checkpoint, and one whose files do not match it is refused as corrupt

The directory is assembled under ``.tmp-step-N`` and renamed into place, so a crash mid-write never leaves a
checkpoint that looks complete. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rlfleet.errors import CheckpointError

MARKER = "COMPLETE"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def staging_dir(output_dir: str | Path, step: int) -> Path:
    tmp = checkpoints_dir(output_dir) / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_state(directory: Path, replay_state: tuple[dict[str, np.ndarray], dict], driver_state: dict) -> None:
    arrays, meta = replay_state
    np.savez(directory / "replay.npz", **arrays)
    (directory / "replay.json").write_text(json.dumps(meta))
    (directory / "driver.json").write_text(json.dumps(driver_state, indent=2))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, list]:
    return {str(p.relative_to(directory)): [p.stat().st_size, _sha256(p)]
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER}


_HASHED: set[tuple] = set()  # checkpoints whose files this process hashed, as their stat() had them then


def _stat_key(directory: Path, names) -> tuple:
    """What identifies ``directory``'s files as they are now: every file's path, size and modification time."""
    return (str(directory.resolve()), *((n, (s := (directory / n).stat()).st_size, s.st_mtime_ns) for n in names))


def verify(directory: Path, learner_workers: int | None = None, lora: bool | None = None) -> None:
    """Refuse an incomplete, corrupt or incompatible checkpoint with a message that says which and why; with
    ``learner_workers``, also one written by a learner group of another size (its optimizer state is sharded); with
    ``lora``, one whose policy is a full model when the job trains an adapter, or the other way round."""
    marker = directory / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint (no {MARKER} marker): it was interrupted "
                              "while being written; resume from an earlier one")
    try:
        meta = json.loads(marker.read_text())
    except ValueError as err:
        raise CheckpointError(f"{marker} is unreadable: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} has checkpoint format {meta.get('format')!r}; this rlfleet reads format "
                              f"{FORMAT}. Use the rlfleet version that wrote it")
    for name in meta["files"]:
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} is missing")
    seen = _stat_key(directory, meta["files"])
    if seen not in _HASHED:  # once per process while no file changes size or mtime (resume verifies, then reads)
        for name, (size, digest) in meta["files"].items():
            path = directory / name
            if path.stat().st_size != size or _sha256(path) != digest:
                raise CheckpointError(f"checkpoint {directory} is corrupt: {name} does not match its recorded size "
                                      f"({size} bytes) and SHA-256; resume from an earlier checkpoint")
        _HASHED.add(seen)
    written_by = learner_ranks(meta["files"])
    if learner_workers is not None and written_by is not None and written_by != learner_workers:
        raise CheckpointError(
            f"checkpoint {directory} was written by a learner group of {written_by} rank(s) (its optimizer state is "
            f"sharded per rank) and this job has cluster.learner_workers={learner_workers}; resume with "
            f"cluster.learner_workers={written_by} (resharding is not supported)")
    has_adapter = any(n.endswith("adapter_model.safetensors") for n in meta["files"])
    has_model = any(re.search(r"(^|/)model(-\d+-of-\d+)?\.safetensors$", n) for n in meta["files"])
    if lora is not None and lora != has_adapter and (has_adapter or has_model):
        wrote, wants = ("a LoRA adapter", "full fine-tuning") if has_adapter else ("a full model", "model.lora")
        raise CheckpointError(f"checkpoint {directory} holds {wrote} and this job is configured for {wants}; resume "
                              "with the model.lora setting of the run that wrote it")


def learner_ranks(names) -> int | None:
    """The learner group size that wrote the optimizer files among ``names`` (None: no optimizer state)."""
    ranks = {int(m.group(1)) for n in names if (m := re.search(r"optimizer-rank\d+-of-(\d+)\.safetensors$", n))}
    if ranks:
        return max(ranks)
    return 1 if any(re.search(r"(^|/)optimizer\.(safetensors|pt)$", n) for n in names) else None


def commit(staging: Path, step: int, keep_last: int) -> Path:
    """Mark ``staging`` complete, move it to ``step-N`` and prune old checkpoints."""
    (staging / MARKER).write_text(json.dumps({"format": FORMAT, "step": step, "files": _manifest(staging)}))
    final = staging.parent / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in list_checkpoints(staging.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(directory: Path) -> tuple[tuple[dict[str, np.ndarray], dict], dict[str, Any]]:
    """Load replay and driver state; refuse incomplete or corrupt checkpoints with a clear message."""
    verify(directory)
    try:
        with np.load(directory / "replay.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads((directory / "replay.json").read_text())
        driver = json.loads((directory / "driver.json").read_text())
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {directory} is corrupt or incompatible: {err}") from err
    return (arrays, meta), driver
