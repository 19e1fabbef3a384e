"""rlfleet.dpo.data: the three TRL preference formats, their errors, tokenization and ``builtin:prefs``.

Token ids are derived by hand from the tiny tokenizer: token id == byte value, ``<|im_start|>`` 258, ``<|im_end|>``
(EOS) 259, and the chat template ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (+ ``<|im_start|>assistant\\n`` as
the generation prompt).
"""

from __future__ import annotations

import json

import datasets
import pytest

from rlfleet.config import DataConfig
from rlfleet.models import EOS_ID, IM_START_ID, load_tokenizer
from rlfleet.dpo.data import (
    PREFS_ALPHABET,
    PreferencePair,
    extract_prompt,
    load_preference_dataset,
    tokenize_pair,
    tokenize_preferences,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny")


def _b(text: str) -> list[int]:
    return list(text.encode())


def _jsonl(tmp_path, rows, name="prefs.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


USER_HI = [{"role": "user", "content": "hi"}]
ANSWER_A = [{"role": "assistant", "content": "A"}]
ANSWER_B = [{"role": "assistant", "content": "B"}]
# "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
CHAT_PROMPT_IDS = [IM_START_ID] + _b("user\nhi") + [EOS_ID] + _b("\n") + [IM_START_ID] + _b("assistant\n")


# ---------------------------------------------------------------------------------------------- formats


def test_standard_format_appends_eos_once(tokenizer):
    """prompt "ab" -> [97, 98]; chosen "c" + EOS -> [99, 259]; rejected "d<|im_end|>" already ends with EOS, so it is
    not appended again -> [100, 259]."""
    pair = tokenize_pair(tokenizer, "ab", "c", "d<|im_end|>")
    assert pair == PreferencePair([97, 98], [99, EOS_ID], [100, EOS_ID])


def test_conversational_format_applies_the_chat_template(tokenizer):
    """prompt+chosen renders as the prompt's text + "A<|im_end|>\\n", so the completion is [65, 259, 10] and the
    prompt is the template's generation prompt (CHAT_PROMPT_IDS)."""
    pair = tokenize_pair(tokenizer, USER_HI, ANSWER_A, ANSWER_B)
    assert pair.prompt_token_ids == CHAT_PROMPT_IDS
    assert pair.chosen_ids == [65, EOS_ID, 10] and pair.rejected_ids == [66, EOS_ID, 10]


def test_implicit_prompt_strings_move_the_space_to_the_completions():
    """Common prefix of "Q: 2+2? A: 4" and "Q: 2+2? A: 5" is "Q: 2+2? A: "; the space before the divergence goes with
    the completions (TRL's extract_prompt)."""
    assert extract_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == ("Q: 2+2? A:", " 4", " 5")


def test_implicit_prompt_conversations_tokenize_like_the_explicit_form(tmp_path, tokenizer):
    """chosen = [user hi, assistant A], rejected = [user hi, assistant B]: the prompt is the common first message, and
    the tokenized pair equals the explicit conversational one."""
    path = _jsonl(tmp_path, [{"chosen": USER_HI + ANSWER_A, "rejected": USER_HI + ANSWER_B}])
    ds = load_preference_dataset(DataConfig(dataset=path), "train")
    assert ds[0] == {"prompt": USER_HI, "chosen": ANSWER_A, "rejected": ANSWER_B}
    row = tokenize_preferences(ds, tokenizer, max_length=64)[0]
    assert PreferencePair.from_record(row) == tokenize_pair(tokenizer, USER_HI, ANSWER_A, ANSWER_B)


def test_string_prompt_with_conversational_completions_is_extracted(tmp_path):
    """A 'prompt' string next to whole conversations is ignored and the prompt extracted (TRL's
    maybe_extract_prompt)."""
    path = _jsonl(tmp_path, [{"prompt": "hi", "chosen": USER_HI + ANSWER_A, "rejected": USER_HI + ANSWER_B}])
    assert load_preference_dataset(DataConfig(dataset=path), "train")[0]["prompt"] == USER_HI


def test_local_standard_file_with_column_mapping(tmp_path, tokenizer):
    path = _jsonl(tmp_path, [{"question": "ab", "good": "c", "bad": "d"}])
    cfg = DataConfig(dataset=path, column_mapping={"question": "prompt", "good": "chosen", "bad": "rejected"})
    ds = tokenize_preferences(load_preference_dataset(cfg, "train"), tokenizer, max_length=16)
    assert ds.column_names == ["prompt_token_ids", "chosen_ids", "rejected_ids"]
    assert ds[0] == {"prompt_token_ids": [97, 98], "chosen_ids": [99, EOS_ID], "rejected_ids": [100, EOS_ID]}


def test_max_length_drops_rows_whose_prompt_fills_it(tokenizer):
    """max_length 4: prompt "abcd" has 4 tokens (>= 4, dropped, TRL's keep_start filter), "ab" has 2 (kept)."""
    ds = datasets.Dataset.from_list([{"prompt": "abcd", "chosen": "x", "rejected": "y"},
                                     {"prompt": "ab", "chosen": "x", "rejected": "y"}])
    kept = tokenize_preferences(ds, tokenizer, max_length=4)
    assert kept["prompt_token_ids"] == [[97, 98]]
    with pytest.raises(ValueError, match="dpo.max_length=2"):
        tokenize_preferences(ds, tokenizer, max_length=2)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_column_names_it_and_the_fix(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match=r"no \['rejected'\] column.*column_mapping"):
        load_preference_dataset(DataConfig(dataset=path), "train")


def test_column_mapping_of_an_absent_column(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(ValueError, match=r"data.column_mapping: column\(s\) \['good'\]"):
        load_preference_dataset(DataConfig(dataset=path, column_mapping={"good": "chosen"}), "train")


def test_empty_data(tmp_path):
    """A CSV with the columns' header only, and a parquet file with the columns but zero rows (both caught where the
    file is read, by rlfleet.data's local loader)."""
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match="is empty"):
        load_preference_dataset(DataConfig(dataset=str(header_only)), "train")
    no_rows = tmp_path / "no_rows.parquet"
    datasets.Dataset.from_dict({"chosen": [], "rejected": []}).to_parquet(str(no_rows))
    with pytest.raises(ValueError, match="no_rows.parquet' is empty"):
        load_preference_dataset(DataConfig(dataset=str(no_rows)), "train")


def test_rows_of_the_wrong_kind_or_without_a_completion_name_the_row(tmp_path):
    """Implicit prompt: "ab" is a prefix of "abc", so after extraction chosen is empty (row 1)."""
    path = _jsonl(tmp_path, [{"chosen": "ax", "rejected": "ay"}, {"chosen": "ab", "rejected": "abc"}])
    with pytest.raises(ValueError, match="row 1: the completion 'chosen' or 'rejected' is empty"):
        load_preference_dataset(DataConfig(dataset=path), "train")
    path = _jsonl(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": 3}], name="mixed.jsonl")
    with pytest.raises(ValueError, match="row 0: 'chosen' and 'rejected' must both be strings"):
        load_preference_dataset(DataConfig(dataset=path), "train")


def test_unknown_builtin_and_split():
    with pytest.raises(ValueError, match="'builtin:nope' is not a built-in preference dataset"):
        load_preference_dataset(DataConfig(dataset="builtin:nope"), "train")
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_preference_dataset(DataConfig(dataset="builtin:prefs"), "validation")


# ---------------------------------------------------------------------------------------------- builtin:prefs


def test_builtin_prefs_is_seeded_and_consistent(tokenizer):
    """Every row: the prompt ends with a letter c of a..h; chosen = C * n, rejected = D * n with D != C another capital
    of A..H, n in 1..3. Splits have 512 and 64 rows, differ from each other, and regenerate identically."""
    cfg = DataConfig(dataset="builtin:prefs")
    train, test = load_preference_dataset(cfg, "train"), load_preference_dataset(cfg, "test")
    assert (len(train), len(test)) == (512, 64)
    assert train.to_list() == load_preference_dataset(cfg, "train").to_list()
    assert train.to_list()[:64] != test.to_list()
    for row in train.to_list() + test.to_list():
        c, n = row["prompt"][-1], len(row["chosen"])
        assert c in PREFS_ALPHABET and row["chosen"] == c.upper() * n and 1 <= n <= 3
        d = row["rejected"][0]
        assert row["rejected"] == d * n and d != c.upper() and d.lower() in PREFS_ALPHABET
    pair = PreferencePair.from_record(tokenize_preferences(test, tokenizer, max_length=64)[0])
    row = test[0]
    assert pair.prompt_token_ids == _b(row["prompt"]) and pair.chosen_ids == _b(row["chosen"]) + [EOS_ID]
    assert pair.rejected_ids == _b(row["rejected"]) + [EOS_ID]


def test_builtin_prefs_max_prompts():
    assert len(load_preference_dataset(DataConfig(dataset="builtin:prefs", max_prompts=10), "train")) == 10
