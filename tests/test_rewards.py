"""GSM8K reward functions: number extraction, exact decimal comparison, TRL's calling convention."""

from decimal import Decimal

import pytest

from rlfleet.user_code import resolve_function
from rlfleet.rewards import format_reward, gold_number, gsm8k_accuracy, last_number

# The first GSM8K training row's answer, verbatim (its worked solution ends in "#### 72").
NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("text, expected", [
    ("The answer is 72.", Decimal("72")),           # the sentence's full stop is not a decimal part
    ("48 + 24 = 72", Decimal("72")),                # the last of three numbers
    ("She pays $1,000.50 in total", Decimal("1000.50")),  # thousands separator and cents
    ("3, 4, and 5", Decimal("5")),                  # ", 4" is a list, not a separator: three numbers
    ("1,2", Decimal("2")),                          # "1,2" is not a thousands group (needs 3 digits): "1" and "2"
    ("The temperature fell to -3 degrees", Decimal("-3")),
    ("no digits here", None),
])
def test_last_number(text, expected):
    """Expected values read off each string by hand, following the rules in rlfleet.rewards.NUMBER."""
    assert last_number(text) == expected


@pytest.mark.parametrize("answer, expected", [
    (NATALIA, Decimal("72")),
    ("so the total is\n#### 1,000", Decimal("1000")),
    ("####-5", Decimal("-5")),
    ("#### $18", Decimal("18")),
    ("42", Decimal("42")),                          # a bare number (already-extracted answers)
])
def test_gold_number(answer, expected):
    assert gold_number(answer) == expected


@pytest.mark.parametrize("answer", ["The answer is seventy-two.", "#### 72 apples", ""])
def test_gold_number_rejects_non_gsm8k_answers_naming_the_column(answer):
    with pytest.raises(ValueError, match="'answer' column"):
        gold_number(answer)


def test_gsm8k_accuracy_hand_cases():
    """Gold 72 for every row. Completions and their last numbers:
    "... altogether 72."          -> 72        -> 1
    "#### 72.00"                  -> 72.00     -> 1 (decimal equality: 72.00 == 72)
    "72 clips, then 48 more"      -> 48        -> 0 (only the last number counts)
    "I am not sure."              -> none      -> 0
    conversational "...is 72"     -> 72        -> 1 (message contents are read)
    Expected [1, 1, 0, 0, 1].
    """
    completions = [
        "48 + 24 makes altogether 72.",
        "#### 72.00",
        "72 clips, then 48 more",
        "I am not sure.",
        [{"role": "assistant", "content": "The total is 72"}],
    ]
    n = len(completions)
    out = gsm8k_accuracy(prompts=["q"] * n, completions=completions, completion_ids=[[1]] * n, answer=[NATALIA] * n)
    assert out == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_gsm8k_accuracy_compares_each_completion_with_its_own_answer():
    """Row 0: last number 7, gold 7 -> 1. Row 1: last number 7, gold 8 -> 0. Expected [1, 0]."""
    out = gsm8k_accuracy(["a", "b"], ["so 7", "so 7"], answer=["#### 7", "#### 8"])
    assert out == [1.0, 0.0]


def test_gsm8k_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        gsm8k_accuracy(["a", "b"], ["1", "2"], answer=["#### 1"])


def test_format_reward_hand_cases():
    """An answer line is '####', optional spaces / '$', then a number:
    "... #### 72" -> 1;  "####$ 18" -> 1;  "the answer is 72" -> 0 (no marker);  "#### seventy" -> 0 (no number).
    Expected [1, 1, 0, 0].
    """
    completions = ["so the total is\n#### 72", "####$ 18", "the answer is 72", "#### seventy"]
    assert format_reward(prompts=["q"] * 4, completions=completions) == [1.0, 1.0, 0.0, 0.0]


def test_config_paths_resolve_to_these_functions():
    """The job configs name the functions as 'rlfleet.rewards:<name>'; the generator resolves them the same way."""
    assert resolve_function("rlfleet.rewards:gsm8k_accuracy", {}, "algorithm.reward_funcs[0]") is gsm8k_accuracy
    assert resolve_function("rlfleet.rewards:format_reward", {}, "algorithm.reward_funcs[1]") is format_reward
