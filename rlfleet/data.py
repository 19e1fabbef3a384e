"""Prompt datasets: built-in tasks, local files and hub datasets; the prompt stream. (The built-in tasks' reward
functions are in :mod:`rlfleet.rewards`.)

A prompt dataset is a ``datasets.Dataset`` with a ``prompt`` column, in TRL's formats: a plain string ("standard")
or a list of ``{"role", "content"}`` messages ("conversational"). Every other column is passed to the reward
functions as a keyword argument, one value per completion (TRL's signature)::

    reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]

Built-in tasks are generated from a fixed seed per split (no download) and chosen so that the random-init byte-level
``builtin:tiny`` model (token id == byte value, EOS ``<|im_end|>``) visibly learns them in minutes on a CPU:

- ``char_count`` (conversational): "write the letter c many times"; reward = share of the completion's bytes equal
  to the ``target`` character. Dense: any extra target byte raises it.
- ``target_length`` (standard): "reply in N tokens"; reward = min(L, N) / max(L, N) with L the number of sampled
  tokens (the EOS included), so it peaks at L = N and the model must learn to emit EOS. It stays positive for long
  completions, so truncated ones still rank by length and give a gradient towards stopping.

:class:`PromptStream` serves prompts in a seeded per-epoch order and checkpoints its cursor.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from rlfleet.code_task import PROBLEMS, code_rows
from rlfleet.config import DataConfig

BUILTIN_PREFIX = "builtin:"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# ----------------------------------------------------------------------------------------------------------------
# Built-in tasks
# ----------------------------------------------------------------------------------------------------------------

CHAR_COUNT_ALPHABET = "abcdefgh"
CHAR_COUNT_TEMPLATES = (
    "Write the letter {c} as many times as you can.",
    "Repeat {c} over and over: {c}{c}{c}",
    "Only the character '{c}', please.",
)
TARGET_LENGTH_RANGE = (4, 16)  # N, inclusive
TARGET_LENGTH_TEMPLATES = ("Reply in exactly {n} tokens.", "Answer with {n} tokens, no more, no less.")


def _char_count_rows(rng: random.Random, size: int) -> list[dict]:
    rows = []
    for _ in range(size):
        c = rng.choice(CHAR_COUNT_ALPHABET)
        content = rng.choice(CHAR_COUNT_TEMPLATES).format(c=c)
        rows.append({"prompt": [{"role": "user", "content": content}], "target": c})
    return rows


def _target_length_rows(rng: random.Random, size: int) -> list[dict]:
    rows = []
    for _ in range(size):
        n = rng.randint(*TARGET_LENGTH_RANGE)
        rows.append({"prompt": rng.choice(TARGET_LENGTH_TEMPLATES).format(n=n), "target_length": n})
    return rows


@dataclass(frozen=True)
class Task:
    """A built-in task: rows generated from ``(seed, size)`` per split, and its default reward functions."""

    name: str
    make_rows: Callable[[random.Random, int], list[dict]]
    reward_funcs: tuple[str, ...]  # keys of rlfleet.rewards.BUILTIN_REWARDS, or 'package.module:function'
    splits: tuple[tuple[str, int, int], ...] = (("train", 0, 1024), ("test", 1, 128))  # (split, seed, size)

    def dataset(self, split: str) -> datasets.Dataset:
        for name, seed, size in self.splits:
            if name == split:
                return datasets.Dataset.from_list(self.make_rows(random.Random(seed), size))
        known = ", ".join(repr(s) for s, _, _ in self.splits)
        raise ValueError(f"data.split: built-in task {self.name!r} has no split {split!r}; use one of {known}")


BUILTIN_TASKS: dict[str, Task] = {
    "char_count": Task("char_count", _char_count_rows, ("char_count",)),
    "target_length": Task("target_length", _target_length_rows, ("target_length",)),
    # function-writing problems run against their tests in the sandbox (rlfleet/code_task.py, rlfleet/sandbox.py)
    "code": Task("code", code_rows, ("rlfleet.rewards:code_tests_reward",),
                 (("train", 0, len(PROBLEMS)), ("test", 1, len(PROBLEMS)))),
}


def builtin_task(dataset: str) -> Task | None:
    """The task named by ``'builtin:<task>'``; None for other datasets. Raises for an unknown built-in name."""
    if not dataset.startswith(BUILTIN_PREFIX):
        return None
    name = dataset[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_TASKS:
        known = ", ".join(f"'builtin:{t}'" for t in BUILTIN_TASKS)
        raise ValueError(f"data.dataset: {dataset!r} is not a built-in task; use one of {known}")
    return BUILTIN_TASKS[name]


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------


def is_local_file(name: str) -> bool:
    """True for a local file or directory (an existing path, a data file's extension, or a path-like name)."""
    return (Path(name).suffix.lower() in LOCAL_FORMATS or os.path.exists(name)
            or name.startswith(("/", ".", "~")) or name.endswith("/"))


def local_splits(name: str) -> dict[str, Path]:
    """A local dataset's split files: a file is one split, 'train' (the name the datasets library gives it); a
    directory holds one split per .json/.jsonl/.parquet/.csv file, named by the file's stem."""
    path = Path(name).expanduser()
    formats = ", ".join(LOCAL_FORMATS)
    if path.is_dir():
        splits: dict[str, Path] = {}
        for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_FORMATS):
            if file.stem in splits:
                raise ValueError(f"data.dataset: directory {str(path)!r} has two files for split {file.stem!r} "
                                 f"({splits[file.stem].name}, {file.name}); keep one")
            splits[file.stem] = file
        if not splits:
            raise ValueError(f"data.dataset: directory {str(path)!r} has no split files ({formats}); add one per "
                             "split, named by the split: train.jsonl, test.jsonl")
        return splits
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS and path.exists():
        raise ValueError(f"data.dataset: {name!r} has extension {suffix!r}; local files must be one of {formats}")
    if not path.is_file():
        if suffix in LOCAL_FORMATS:
            raise FileNotFoundError(f"data.dataset: file {str(path)!r} does not exist; check the path")
        raise FileNotFoundError(f"data.dataset: {name!r} is neither a file nor a directory; check the path")
    return {"train": path}


def split_names(spec: str) -> list[str]:
    """The splits a split spec in the datasets library's syntax reads: 'train[:90%]+test' -> ['train', 'test']."""
    try:
        datasets.ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError) as err:
        raise ValueError(f"data.split: {spec!r} is not a split in the datasets library's syntax ({err}); e.g. "
                         "'train', 'train[:90%]', 'train[90%:]', 'train[:40]', 'train[40:]'") from None
    return [part.split("[")[0].strip() for part in spec.split("+")]


def load_local(name: str, spec: str) -> datasets.Dataset:
    """Split ``spec`` (the datasets library's syntax, e.g. 'train[:90%]') of a local file or directory."""
    files = local_splits(name)
    for split in split_names(spec):
        if split in files:
            continue
        if len(files) == 1 and "train" in files and not Path(name).expanduser().is_dir():
            raise ValueError(
                f"data.split: a single file holds one split, named 'train'; got {spec!r}. Slice it in the datasets "
                "library's syntax ('train[:90%]' to train on, 'train[90%:]' to evaluate on), give evaluation its "
                "own file (data.eval_dataset), or use a directory of split files (train.jsonl, test.jsonl)")
        raise ValueError(f"data.split: directory {str(Path(name).expanduser())!r} has no split {split!r}; its split "
                         f"files are {', '.join(f.name for f in files.values())} (a split is named by its file's "
                         f"stem): use one of {', '.join(repr(s) for s in files)}")
    tables = {split: read_local_file(files[split]) for split in split_names(spec)}
    if spec in tables:  # a whole split
        return tables[spec]
    rows = datasets.ReadInstruction.from_spec(spec).to_absolute({s: len(t) for s, t in tables.items()})
    parts = [tables[part.splitname].select(range(part.from_, part.to)) for part in rows]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def read_local_file(path: Path) -> datasets.Dataset:
    """The rows of one .json/.jsonl/.parquet/.csv file; errors name the file and, for JSON, the line."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:  # datasets raises StopIteration on an empty .jsonl
        raise ValueError(f"data.dataset: file {str(path)!r} is empty; it needs at least one row")
    fmt = LOCAL_FORMATS[suffix]
    readers = logging.getLogger("datasets.packaged_modules")  # their 'Failed to load ...': said below, once
    level = readers.level
    readers.setLevel(logging.CRITICAL)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # 'Generating train split', among the messages of the checks
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as err:  # datasets' and pyarrow's errors for a file that cannot be read: named, not traced
        if isinstance(err, ValueError) and "no data" in str(err):  # datasets': 'Instruction "train" ... no data'
            raise ValueError(f"data.dataset: file {str(path)!r} is empty; it needs at least one row") from err
        if fmt == "json" and (where := json_problem(path)) is not None:
            raise ValueError(f"data.dataset: file {str(path)!r}: {where}") from err
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:  # the library's own reason, innermost
            cause = cause.__cause__ or cause.__context__
        reason = (str(cause).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"data.dataset: file {str(path)!r} cannot be read as {suffix[1:]}: "
                         f"{type(cause).__name__}: {reason}") from err
    finally:
        readers.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def json_problem(path: Path) -> str | None:
    """The first place where a .json/.jsonl file stops being rows, with the fix: the first line of JSON lines that
    does not parse or is not an object (its number, the reason, the line's start), or where a file that is one JSON
    document stops parsing; None when it parses."""
    with path.open(encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        as_lines = path.suffix.lower() == ".jsonl" or isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        as_lines = False
    if not as_lines:  # one document: a list of rows, or an object spread over lines
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            return f"not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); fix the file"
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return (f"line {number} is not valid JSON ({err.msg}: column {err.colno}): {line.strip()[:60]!r}; "
                        "fix or remove that line")
            if not isinstance(row, dict):
                return (f"line {number} is a JSON {type(row).__name__}, not an object (one row per line): "
                        f"{line.strip()[:60]!r}; fix or remove that line")
    return None


def _check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                   for m in prompt):
        return
    raise ValueError(
        f"{where}: a prompt must be a string or a non-empty list of {{'role', 'content'}} messages; "
        f"got {str(prompt)[:80]!r}"
    )


def as_conversation(prompt: str | list[dict], system_prompt: str) -> list[dict]:
    """``prompt`` as messages that start with the system message ``system_prompt`` (none if it is empty): a string is
    the user's message; a conversation that has a system message keeps its own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def load_mapped(cfg: DataConfig, split: str, builtin: Callable[[str], datasets.Dataset] | None) -> datasets.Dataset:
    """``cfg.dataset`` loaded (``builtin(split)`` for a built-in, else a local file, else the hub with
    ``cfg.dataset_config``) and its columns renamed by ``cfg.column_mapping``."""
    name = cfg.dataset
    if builtin is not None:
        ds = builtin(split)
    elif is_local_file(name):
        ds = load_local(name, split)
    else:
        ds = datasets.load_dataset(name, cfg.dataset_config, split=split)
    missing = [src for src in cfg.column_mapping if src not in ds.column_names]
    if missing:
        raise ValueError(
            f"data.column_mapping: column(s) {missing} not in dataset {name!r} (columns: {ds.column_names})"
        )
    return ds.rename_columns(dict(cfg.column_mapping)) if cfg.column_mapping else ds


def load_prompt_dataset(cfg: DataConfig, split: str, seed: int = 0) -> datasets.Dataset:
    """The prompt dataset named by ``cfg.dataset``, columns renamed by ``cfg.column_mapping``, validated.

    ``'builtin:<task>'``: generated (splits 'train' and 'test'). A local ``.json/.jsonl/.parquet/.csv`` file: one
    split, 'train'; a directory of them: a split per file, named by its stem; ``split`` may slice them in the
    datasets library's syntax ('train[:90%]'). Anything else: ``datasets.load_dataset(name, split=split)`` (the
    hub). ``cfg.max_prompts`` keeps the first N rows, after a shuffle with ``seed`` when ``cfg.shuffle``. Raises
    ``FileNotFoundError`` or ``ValueError`` naming the field and the fix.
    """
    name = cfg.dataset
    task = builtin_task(name)
    ds = load_mapped(cfg, split, task.dataset if task is not None else None)
    if "prompt" not in ds.column_names:
        raise ValueError(
            f"data.dataset: {name!r} has no 'prompt' column (columns: {ds.column_names}); rename one with "
            "data.column_mapping, e.g. {question: prompt}"
        )
    if len(ds) == 0:
        raise ValueError(f"data.dataset: {name!r} split {split!r} is empty; it needs at least one prompt")
    for i, prompt in enumerate(ds.select(range(min(len(ds), 100)))["prompt"]):
        _check_prompt(prompt, f"data.dataset {name!r} row {i}")
    if cfg.system_prompt is not None:
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a bar per load, on every generator, for a map of milliseconds
        try:
            ds = ds.map(lambda row: {"prompt": as_conversation(row["prompt"], cfg.system_prompt)})
        finally:
            if bars:
                datasets.enable_progress_bars()
    if cfg.max_prompts is not None and cfg.max_prompts < len(ds):
        ds = (ds.shuffle(seed=seed) if cfg.shuffle else ds).select(range(cfg.max_prompts))
    return ds


def eval_data(cfg: DataConfig) -> DataConfig:
    """The evaluation data as a data section: ``eval_dataset`` (subset ``eval_dataset_config``, split ``eval_split``,
    default 'train': its whole file) if set, else ``dataset`` (split ``eval_split``); its first ``max_eval_prompts``
    rows, in order. Column mapping and system prompt are the training data's."""
    update = {"split": cfg.eval_split, "max_prompts": cfg.max_eval_prompts, "shuffle": False}
    if cfg.eval_dataset is not None:
        update |= {"dataset": cfg.eval_dataset, "dataset_config": cfg.eval_dataset_config,
                   "split": cfg.eval_split or "train"}
    return cfg.model_copy(update=update)


def _split_source(name: str, config: str | None, split: str) -> str:
    """What split ``split`` of dataset ``name`` reads, the same for every way of naming it: a file's resolved path
    (a directory's split is its file), a hub dataset's subset and split, a built-in dataset's split."""
    if name.startswith(BUILTIN_PREFIX):
        return f"{name!r} split {split!r}"
    if is_local_file(name):
        files = local_splits(name)
        return repr(str(files[split].resolve())) if split in files else f"{name!r} split {split!r}"
    return f"hub dataset {name!r} ({config or 'default'} subset) split {split!r}"


def _split_length(name: str, config: str | None, split: str) -> int:
    if is_local_file(name):
        return len(read_local_file(local_splits(name)[split]))
    return len(datasets.load_dataset(name, config, split=split))


def training_overlap(cfg: DataConfig) -> str | None:
    """Where the evaluation split (:func:`eval_data`) reads rows of the training split (``split`` of ``dataset``),
    before ``max_prompts``: 'rows a-b of <source>; ...', or None when they share none. Splits of different sources
    never share rows; a split's length is read only where both read the same source (a built-in split, never
    sliced, is shared whole)."""
    ev = eval_data(cfg)
    train = [(_split_source(cfg.dataset, cfg.dataset_config, s), s, part)
             for s, part in zip(split_names(cfg.split), cfg.split.split("+"))]
    held = [(_split_source(ev.dataset, ev.dataset_config, s), s, part)
            for s, part in zip(split_names(ev.split), ev.split.split("+"))]
    where = []
    for source, split in dict.fromkeys((k, s) for k, s, _ in train if k in {k for k, _, _ in held}):
        if cfg.dataset.startswith(BUILTIN_PREFIX):
            where.append(f"all rows of {source}")
            continue
        n = _split_length(cfg.dataset, cfg.dataset_config, split)
        trained, evaluated = ([datasets.ReadInstruction.from_spec(part).to_absolute({split: n})[0]
                               for k, _, part in parts if k == source] for parts in (train, held))
        for a in trained:
            for b in evaluated:
                if (lo := max(a.from_, b.from_)) < (hi := min(a.to, b.to)):
                    where.append(f"rows {lo}-{hi - 1} of {source}")
    return "; ".join(where) or None


def eval_on_train_problem(cfg: DataConfig) -> str | None:
    """Evaluation on training rows without ``eval_on_train``, or ``eval_on_train`` where none are shared."""
    overlap = training_overlap(cfg)
    split = eval_data(cfg).split
    of = f" of data.eval_dataset {cfg.eval_dataset!r}" if cfg.eval_dataset is not None else ""
    if overlap is not None and not cfg.eval_on_train:
        hold_out = ("use the held-out split (data.eval_split: test)" if cfg.dataset.startswith(BUILTIN_PREFIX) else
                    "hold rows out in the datasets library's syntax (data.split: 'train[:90%]', data.eval_split: "
                    "'train[90%:]')")
        return (f"data.eval_split: {split!r}{of} reads training prompts (data.split {cfg.split!r}: {overlap}), so "
                f"it is not held out. To evaluate on held-out prompts, {hold_out} or name other data with "
                "data.eval_dataset; to evaluate on training prompts knowingly, set data.eval_on_train: true (they "
                "are then reported as training prompts)")
    if overlap is None and cfg.eval_on_train:
        return (f"data.eval_on_train: true, but the evaluation split ({split!r}{of}) shares no row with the "
                f"training split (data.split {cfg.split!r}): it is held out; remove data.eval_on_train")
    return None


def eval_load_problem(cfg: DataConfig, err: Exception) -> str:
    """An error loading the evaluation data (:func:`eval_data`), named by the evaluation's fields."""
    message = str(err).removeprefix("data.split: ").removeprefix("data.dataset: ")
    if cfg.eval_dataset is not None:
        return (f"data.eval_dataset: {cfg.eval_dataset!r} split {eval_data(cfg).split!r} cannot be loaded for "
                f"evaluation: {message}")
    return f"data.eval_split: {cfg.eval_split!r} cannot be loaded for evaluation: {message}"


# ----------------------------------------------------------------------------------------------------------------
# The prompt stream
# ----------------------------------------------------------------------------------------------------------------


class PromptStream:
    """Prompts in epochs: epoch e visits every row once, in ``permutation(seed, e)`` order (or dataset order).

    A record is the row's columns plus ``prompt_id``: the row's ``prompt_id`` column as a string if the dataset has
    one, else its index. ``state_dict()`` is the cursor ``(epoch, position)``; a stream loaded with it continues
    the same order, since each epoch's permutation is recomputed from ``(seed, epoch)``.
    """

    def __init__(self, dataset: datasets.Dataset, seed: int, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("PromptStream: the dataset is empty")
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)  # [num_prompts]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next_batch(self, n: int) -> list[dict]:
        """The next ``n`` records; a batch that crosses an epoch's end continues in the next epoch's order."""
        indices: list[int] = []
        while len(indices) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(indices), len(self._order) - self.position)
            indices.extend(self._order[self.position:self.position + take].tolist())
            self.position += take
        columns = self.dataset[indices]  # {column: [n values]}
        records = [{key: values[i] for key, values in columns.items()} for i in range(n)]
        for record, index in zip(records, indices):
            record["prompt_id"] = str(record.get("prompt_id", index))
        return records

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor; the dataset, seed and shuffle flag must be those it was saved with."""
        mine = {"seed": self.seed, "shuffle": self.shuffle, "num_prompts": len(self.dataset)}
        saved = {key: state[key] for key in mine}
        if saved != mine:
            raise ValueError(f"PromptStream.load_state_dict: saved stream {saved} does not match this one {mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
