"""Prompt datasets, built-in tasks and their rewards, and the prompt stream (no engine, no hub)."""

import json

import pytest

from rlfleet.config import DataConfig
from rlfleet.data import BUILTIN_TASKS, CHAR_COUNT_ALPHABET, TARGET_LENGTH_RANGE, PromptStream, load_prompt_dataset
from rlfleet.rewards import BUILTIN_REWARDS, char_count_reward, target_length_reward


def test_char_count_task_is_conversational_deterministic_and_split():
    train = load_prompt_dataset(DataConfig(dataset="builtin:char_count"), "train")
    again = load_prompt_dataset(DataConfig(dataset="builtin:char_count"), "train")
    test = load_prompt_dataset(DataConfig(dataset="builtin:char_count"), "test")
    assert (len(train), len(test)) == (1024, 128)
    assert train.to_list() == again.to_list()
    assert train.select(range(128)).to_list() != test.to_list()
    for row in train.select(range(50)):
        [message] = row["prompt"]
        assert message["role"] == "user" and row["target"] in CHAR_COUNT_ALPHABET
        assert row["target"] in message["content"]
    assert set(train["target"]) == set(CHAR_COUNT_ALPHABET)
    assert BUILTIN_TASKS["char_count"].reward_funcs == ("char_count",)


def test_target_length_task_is_standard_with_targets_in_range():
    ds = load_prompt_dataset(DataConfig(dataset="builtin:target_length"), "train")
    lo, hi = TARGET_LENGTH_RANGE
    assert all(isinstance(p, str) for p in ds["prompt"])
    assert all(lo <= n <= hi for n in ds["target_length"])
    assert all(str(n) in p for p, n in zip(ds["prompt"], ds["target_length"]))
    assert set(ds["target_length"]) == set(range(lo, hi + 1))


def test_unknown_builtin_task_or_split_is_an_error():
    with pytest.raises(ValueError, match="not a built-in task.*builtin:char_count"):
        load_prompt_dataset(DataConfig(dataset="builtin:nope"), "train")
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_prompt_dataset(DataConfig(dataset="builtin:char_count"), "validation")


def test_char_count_reward_is_share_of_target_bytes():
    """'aaab' -> 3/4; chat 'xa' -> 1/2; '' -> 0 (no bytes); 'aé' is 3 UTF-8 bytes, one 'a' -> 1/3."""
    completions = ["aaab", [{"role": "assistant", "content": "xa"}], "", "a\u00e9"]
    out = char_count_reward(["p"] * 4, completions, target=["a", "a", "b", "a"])
    assert out == pytest.approx([0.75, 0.5, 0.0, 1 / 3])
    assert BUILTIN_REWARDS["char_count"] is char_count_reward


def test_target_length_reward_peaks_at_target():
    """N = 4: L = 4 -> 1; L = 8 -> 4/8; L = 2 -> 2/4; L = 0 -> 0/4."""
    ids = [[1] * 4, [1] * 8, [1] * 2, []]
    out = target_length_reward(["p"] * 4, ["x"] * 4, completion_ids=ids, target_length=[4] * 4)
    assert out == pytest.approx([1.0, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="completion_ids"):
        target_length_reward(["p"], ["x"], target_length=[4])


def test_local_jsonl_with_column_mapping(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"question": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_prompt_dataset(DataConfig(dataset=str(path), column_mapping={"question": "prompt"}), "train")
    assert ds.column_names == ["prompt", "answer"]
    assert ds[1] == {"prompt": [{"role": "user", "content": "q1"}], "answer": "1"}


def test_local_csv(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,target\nsay a,a\nsay b,b\n")
    ds = load_prompt_dataset(DataConfig(dataset=str(path)), "train")
    assert ds.to_list() == [{"prompt": "say a", "target": "a"}, {"prompt": "say b", "target": "b"}]


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_dataset(DataConfig(dataset=str(tmp_path / "missing.jsonl")), "train")
    (tmp_path / "p.txt").write_text("hi")
    with pytest.raises(ValueError, match="extension '.txt'"):
        load_prompt_dataset(DataConfig(dataset=str(tmp_path / "p.txt")), "train")
    good = tmp_path / "good.csv"
    good.write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match="one split, named 'train'"):
        load_prompt_dataset(DataConfig(dataset=str(good)), "test")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("question\nhi\n")
    with pytest.raises(ValueError, match="no 'prompt' column.*column_mapping"):
        load_prompt_dataset(DataConfig(dataset=str(nocol)), "train")
    with pytest.raises(ValueError, match=r"column_mapping: column\(s\) \['query'\]"):
        load_prompt_dataset(DataConfig(dataset=str(nocol), column_mapping={"query": "prompt"}), "train")
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,target\n")
    with pytest.raises(ValueError, match="is empty"):
        load_prompt_dataset(DataConfig(dataset=str(empty)), "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"text": "no role"}]}) + "\n")
    with pytest.raises(ValueError, match="row 0: a prompt must be a string or"):
        load_prompt_dataset(DataConfig(dataset=str(bad)), "train")


def test_hub_names_go_to_load_dataset(monkeypatch):
    """A name that is neither built-in nor local is passed to datasets.load_dataset (stubbed: no hub in tests)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"problem": "1+1?"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_prompt_dataset(DataConfig(dataset="org/math", column_mapping={"problem": "prompt"}), "test")
    assert calls == [("org/math", None, "test")] and ds["prompt"] == ["1+1?"]
    load_prompt_dataset(DataConfig(dataset="openai/gsm8k", dataset_config="main", column_mapping={"problem": "prompt"}),
                        "train")
    assert calls[-1] == ("openai/gsm8k", "main", "train")


def test_max_prompts_keeps_first_n_after_optional_shuffle():
    full = load_prompt_dataset(DataConfig(dataset="builtin:target_length"), "test")
    first = load_prompt_dataset(DataConfig(dataset="builtin:target_length", shuffle=False, max_prompts=5), "test")
    assert first.to_list() == full.select(range(5)).to_list()
    a = load_prompt_dataset(DataConfig(dataset="builtin:target_length", max_prompts=5), "test", seed=1)
    b = load_prompt_dataset(DataConfig(dataset="builtin:target_length", max_prompts=5), "test", seed=1)
    assert len(a) == 5 and a.to_list() == b.to_list() and a.to_list() != first.to_list()


def _ids(records):
    return [r["prompt_id"] for r in records]


def test_prompt_stream_epochs_are_seeded_permutations():
    ds = load_prompt_dataset(DataConfig(dataset="builtin:target_length"), "test")  # 128 rows
    stream = PromptStream(ds, seed=3)
    epoch0 = _ids(stream.next_batch(100)) + _ids(stream.next_batch(28))
    epoch1 = _ids(stream.next_batch(128))
    assert sorted(epoch0, key=int) == [str(i) for i in range(128)]  # every prompt once per epoch
    assert sorted(epoch1, key=int) == sorted(epoch0, key=int) and epoch1 != epoch0
    assert epoch0 == _ids(PromptStream(ds, seed=3).next_batch(128))  # same seed, same order
    assert epoch0 != _ids(PromptStream(ds, seed=4).next_batch(128))
    assert _ids(PromptStream(ds, seed=3, shuffle=False).next_batch(128)) == [str(i) for i in range(128)]
    record = PromptStream(ds, seed=3, shuffle=False).next_batch(1)[0]
    assert record == {**ds[0], "prompt_id": "0"}


def test_prompt_stream_resumes_the_same_order_across_epochs():
    """Save after 150 of 128-prompt epochs (epoch 1, position 22); a fresh stream continues identically."""
    ds = load_prompt_dataset(DataConfig(dataset="builtin:target_length"), "test")
    a = PromptStream(ds, seed=7)
    a.next_batch(100)
    a.next_batch(50)
    state = a.state_dict()
    assert (state["epoch"], state["position"]) == (1, 22)
    b = PromptStream(ds, seed=7)
    b.load_state_dict(state)
    assert _ids(b.next_batch(200)) == _ids(a.next_batch(200))
    with pytest.raises(ValueError, match="does not match"):
        PromptStream(ds, seed=8).load_state_dict(state)


def test_prompt_stream_uses_a_prompt_id_column():
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "x", "prompt_id": 41}, {"prompt": "y", "prompt_id": 42}])
    assert _ids(PromptStream(ds, seed=0, shuffle=False).next_batch(3)) == ["41", "42", "41"]
