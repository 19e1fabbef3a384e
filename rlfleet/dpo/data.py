"""Preference datasets for DPO: loading, validation, tokenization, and the built-in ``builtin:prefs``.

A preference dataset is a ``datasets.Dataset`` in one of TRL's formats:

- **standard**: ``prompt``, ``chosen``, ``rejected`` strings. EOS is appended to ``chosen`` and ``rejected`` when
  missing (TRL does the same), so the model learns to stop.
- **conversational**: each column a list of ``{"role", "content"}`` messages; the tokenizer's chat template renders
  ``prompt`` (with the generation prompt) and ``prompt + chosen`` / ``prompt + rejected``.
- **implicit prompt**: ``chosen`` and ``rejected`` only, each holding the whole text or conversation; the prompt is
  their longest common prefix (of characters, or of messages). A ``prompt`` column whose kind (string / messages)
  differs from ``chosen`` is treated the same way, as TRL's ``maybe_extract_prompt`` does.

Tokenization follows TRL's ``DPOTrainer``: the completion starts where the tokenized prompt and the tokenized
prompt + completion diverge (a BPE may merge tokens across the boundary), and rows whose prompt alone fills
``max_length`` are dropped (truncation keeps the start, so no completion token would be left). Collation truncates
longer rows to ``max_length`` (``rlfleet.dpo.learner.collate_pairs``).

``builtin:prefs`` is generated from a seed per split (no download): a prompt asking to capitalize a letter ``c`` of
``abcdefgh``; chosen is ``C`` repeated ``n`` (1 to 3) times, rejected another capital repeated ``n`` times (same
length, so summed log-probabilities compare fairly). The random-init ``builtin:tiny`` model has no preference at first
(the policy prefers the chosen completion for about half the held-out pairs) and learns the mapping within a few dozen
DPO steps of 8 pairs on one CPU core (``deploy/dpo_quickstart.yaml``). The held-out split holds other rows of the same
distribution.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import datasets

from rlfleet.config import DataConfig
from rlfleet.data import BUILTIN_PREFIX, load_mapped

Messages = list[dict[str, str]]


@dataclass
class PreferencePair:
    """One tokenized preference pair: the prompt's tokens and the two completions' tokens (EOS included)."""

    prompt_token_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PreferencePair:
        return cls(list(record["prompt_token_ids"]), list(record["chosen_ids"]), list(record["rejected_ids"]))


# ----------------------------------------------------------------------------------------------------------------
# The built-in synthetic preference dataset
# ----------------------------------------------------------------------------------------------------------------

PREFS_ALPHABET = "abcdefgh"
PREFS_TEMPLATES = ("Capitalize: {c}", "Upper case, please: {c}", "Make it a capital: {c}")
PREFS_LENGTH_RANGE = (1, 3)  # n, inclusive
PREFS_SPLITS = {"train": (0, 512), "test": (1, 64)}  # split: (seed, size)


def builtin_prefs(split: str) -> datasets.Dataset:
    """``builtin:prefs`` rows (standard format) from ``random.Random(seed)`` of the split."""
    if split not in PREFS_SPLITS:
        raise ValueError(f"data.split: 'builtin:prefs' has no split {split!r}; use one of {sorted(PREFS_SPLITS)}")
    seed, size = PREFS_SPLITS[split]
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        good, bad = rng.sample(PREFS_ALPHABET, 2)
        n = rng.randint(*PREFS_LENGTH_RANGE)
        rows.append({"prompt": rng.choice(PREFS_TEMPLATES).format(c=good), "chosen": good.upper() * n,
                     "rejected": bad.upper() * n})
    return datasets.Dataset.from_list(rows)


BUILTIN_PREFERENCES = {"prefs": builtin_prefs}


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------


def load_preference_dataset(cfg: DataConfig, split: str) -> datasets.Dataset:
    """The preference dataset named by ``cfg.dataset`` with columns ``prompt``, ``chosen``, ``rejected``.

    ``'builtin:prefs'`` (splits 'train', 'test'), a local ``.json/.jsonl/.parquet/.csv`` file (split 'train'), or a
    hub dataset. Columns are renamed by ``cfg.column_mapping`` first; an implicit prompt is extracted. Raises
    ``ValueError`` / ``FileNotFoundError`` naming the field and the fix for missing columns, empty data or rows of
    the wrong kind. ``cfg.max_prompts`` keeps the first N rows.
    """
    name = cfg.dataset
    builtin = None
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX):]
        if key not in BUILTIN_PREFERENCES:
            known = ", ".join(f"'builtin:{k}'" for k in BUILTIN_PREFERENCES)
            raise ValueError(f"data.dataset: {name!r} is not a built-in preference dataset; use one of {known}")
        builtin = BUILTIN_PREFERENCES[key]
    ds = load_mapped(cfg, split, builtin)
    absent = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if absent:
        raise ValueError(
            f"data.dataset: {name!r} has no {absent} column(s) (columns: {ds.column_names}); a preference dataset "
            "needs 'chosen' and 'rejected' (and optionally 'prompt'); rename with data.column_mapping, e.g. "
            "{response_a: chosen}"
        )
    if len(ds) == 0:
        raise ValueError(f"data.dataset: {name!r} split {split!r} is empty; it needs at least one preference pair")
    rows = [_normalize_row(row, f"data.dataset {name!r} row {i}") for i, row in enumerate(ds)]
    if cfg.max_prompts is not None:
        rows = rows[: cfg.max_prompts]
    return datasets.Dataset.from_list(rows)


def _kind(value: Any) -> str | None:
    """'standard' for a string, 'conversational' for a non-empty list of role/content messages, else None."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                 for m in value):
        return "conversational"
    return None


def extract_prompt(chosen: str | Messages, rejected: str | Messages) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) with the prompt = the longest common prefix of ``chosen`` and ``rejected``.

    Strings: a space just before the point of divergence goes with the completions (TRL). Messages: the common
    prefix of whole messages.
    """
    i = 0
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    if isinstance(chosen, str) and i > 0 and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _normalize_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """``{prompt, chosen, rejected}`` of one kind, the prompt extracted when implicit; raises naming the row."""
    chosen, rejected = row["chosen"], row["rejected"]
    kind = _kind(chosen)
    if kind is None or _kind(rejected) != kind:
        raise ValueError(
            f"{where}: 'chosen' and 'rejected' must both be strings or both non-empty lists of "
            f"{{'role', 'content'}} messages; got {str(chosen)[:60]!r} and {str(rejected)[:60]!r}"
        )
    prompt = row.get("prompt")
    if prompt is None or _kind(prompt) != kind:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if not chosen or not rejected:
        raise ValueError(
            f"{where}: the completion 'chosen' or 'rejected' is empty after the prompt (is one a prefix of the "
            "other?); each pair needs two different non-empty completions"
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------------


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer, prompt: str | Messages, chosen: str | Messages, rejected: str | Messages
                  ) -> PreferencePair:
    """Token ids of one normalized row (see the module doc for the formats and the prompt boundary).

    As TRL: standard text is tokenized with the tokenizer's special tokens (e.g. a BOS), a rendered chat template
    without (the template writes its own).
    """
    if isinstance(chosen, list):  # conversational
        texts = [tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                 tokenizer.apply_chat_template(prompt + chosen, tokenize=False),
                 tokenizer.apply_chat_template(prompt + rejected, tokenize=False)]
    else:
        eos = tokenizer.eos_token
        texts = [prompt, prompt + (chosen if chosen.endswith(eos) else chosen + eos),
                 prompt + (rejected if rejected.endswith(eos) else rejected + eos)]
    specials = not isinstance(chosen, list)
    prompt_only, with_chosen, with_rejected = (tokenizer(t, add_special_tokens=specials)["input_ids"] for t in texts)
    n = min(_common_prefix_length(prompt_only, with_chosen), _common_prefix_length(prompt_only, with_rejected))
    return PreferencePair(prompt_only[:n], with_chosen[n:], with_rejected[n:])


def tokenize_preferences(ds: datasets.Dataset, tokenizer, max_length: int, where: str = "data.dataset"
                         ) -> datasets.Dataset:
    """Columns ``prompt_token_ids``, ``chosen_ids``, ``rejected_ids``; rows whose prompt has ``>= max_length`` tokens
    are dropped (TRL). Raises when no row is left."""
    pairs = [tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"]) for row in ds]
    kept = [p for p in pairs if len(p.prompt_token_ids) < max_length]
    if not kept:
        raise ValueError(
            f"{where}: every one of the {len(pairs)} prompts has at least dpo.max_length={max_length} tokens, so no "
            "completion token would be left; raise dpo.max_length"
        )
    return datasets.Dataset.from_dict({
        "prompt_token_ids": [p.prompt_token_ids for p in kept],
        "chosen_ids": [p.chosen_ids for p in kept],
        "rejected_ids": [p.rejected_ids for p in kept],
    })
