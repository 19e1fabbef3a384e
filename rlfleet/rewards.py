"""Every built-in reward function (TRL's signature): the built-in tasks' (``BUILTIN_REWARDS``, named by their keys),
and, for jobs on real models, GSM8K-style math and code run against tests.

Use them by path in a job config::

    algorithm:
      reward_funcs: [rlfleet.rewards:gsm8k_accuracy, rlfleet.rewards:format_reward]
      reward_weights: [1.0, 0.2]

GSM8K (``openai/gsm8k``) has a ``question`` column (map it to ``prompt`` with ``data.column_mapping``) and an
``answer`` column whose worked solution ends in ``#### <number>``; every column other than ``prompt`` reaches the
reward functions as a keyword argument, one value per completion. Numbers are compared exactly as decimals, so
``72``, ``72.0`` and ``72.00`` are equal and ``1,000`` reads as ``1000``.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from rlfleet.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

# ----------------------------------------------------------------------------------------------------------------
# The built-in tasks' reward functions (TRL signature; data.BUILTIN_TASKS names them by the keys of BUILTIN_REWARDS)
# ----------------------------------------------------------------------------------------------------------------


def completion_text(completion: str | list[dict]) -> str:
    """The model's text in a standard (str) or conversational completion: the contents of its assistant messages,
    joined (a multi-turn episode's other messages are the environment's)."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")


def final_text(completion: str | list[dict]) -> str:
    """The model's last turn: the completion itself, or its last assistant message's content."""
    if isinstance(completion, str):
        return completion
    return next((m["content"] for m in reversed(completion) if m.get("role", "assistant") == "assistant"), "")


def char_count_reward(prompts, completions, completion_ids=None, *, target, **kwargs) -> list[float]:
    """Share of the completion's UTF-8 bytes equal to ``target``: ``count(target) / max(num_bytes, 1)``, in [0, 1].
    In a multi-turn episode, over the bytes of all the model's turns."""
    out = []
    for completion, char in zip(completions, target, strict=True):
        data = completion_text(completion).encode("utf-8")
        out.append(data.count(char.encode("utf-8")) / max(len(data), 1))
    return out


def target_length_reward(prompts, completions, completion_ids=None, *, target_length, **kwargs) -> list[float]:
    """``min(L, N) / max(L, N)``, L = sampled tokens (EOS included), N = ``target_length``: 1 at L = N."""
    if completion_ids is None:
        raise ValueError("target_length_reward counts tokens: pass completion_ids (TRL and rlfleet both do)")
    out = []
    for ids, n in zip(completion_ids, target_length, strict=True):
        length = len(ids)
        out.append(min(length, n) / max(length, n, 1))
    return out


BUILTIN_REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "char_count": char_count_reward,
    "target_length": target_length_reward,
}



# ----------------------------------------------------------------------------------------------------------------
# GSM8K-style math
# ----------------------------------------------------------------------------------------------------------------

# An optional minus sign, then digits with optional thousands separators (``1,234,567``: groups of exactly three
# after each comma, so ``1,2`` is two numbers), then an optional decimal part. ``$18.`` reads as 18.
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# A final-answer line in GSM8K's own format: ``#### 72`` (spaces and a ``$`` allowed before the number).
ANSWER_LINE = re.compile(r"####\s*\$?\s*" + NUMBER.pattern)


def parse_number(text: str) -> Decimal:
    """``"1,000"`` -> ``Decimal("1000")``; the text must be exactly one number (a match of :data:`NUMBER`)."""
    return Decimal(text.replace(",", ""))


def last_number(text: str) -> Decimal | None:
    """The last number in ``text`` (a match of :data:`NUMBER`), or None if it has none."""
    matches = NUMBER.findall(text)
    return parse_number(matches[-1]) if matches else None


def gold_number(answer: str) -> Decimal:
    """The number after the last ``####`` of a GSM8K answer (or the whole answer, if it is just a number).

    Raises ``ValueError`` naming the answer when there is no such number: the dataset is not GSM8K-style, and the
    reward caller logs the error once and drops the group rather than scoring it as wrong.
    """
    tail = answer.rsplit("####", 1)[-1].strip().lstrip("$").strip()
    if NUMBER.fullmatch(tail) is None:
        raise ValueError(
            f"gsm8k_accuracy: answer {answer[-80:]!r} does not end in '#### <number>'; the 'answer' column must hold "
            "GSM8K-style solutions (or a bare number). Map the right column with data.column_mapping."
        )
    return parse_number(tail)


def gsm8k_accuracy(prompts, completions, completion_ids=None, *, answer, **kwargs) -> list[float]:
    """1.0 where the completion's last number equals the number after ``####`` in ``answer``, else 0.0.

    A completion without any number scores 0.0. ``completions`` are strings or conversational message lists; in a
    multi-turn episode only the model's last turn answers (a number in a tool's result does not count).
    """
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        predicted = last_number(final_text(completion))
        out.append(float(predicted is not None and predicted == gold_number(gold)))
    return out


def format_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1.0 where the completion states its final answer on a GSM8K answer line (``#### <number>``), else 0.0.

    A small weight on it (e.g. 0.2 next to :func:`gsm8k_accuracy`'s 1.0) teaches the model to state an explicit
    final answer; when that line ends the completion, its number is the one :func:`gsm8k_accuracy` reads.
    """
    return [float(ANSWER_LINE.search(final_text(c)) is not None) for c in completions]


# ----------------------------------------------------------------------------------------------------------------
# Code execution (the built-in ``code`` task): the completion's code runs against the record's tests in the sandbox
# ----------------------------------------------------------------------------------------------------------------

# A fenced block: ```python, ```py or a bare ```, up to the closing fence (or the end of a truncated completion).
CODE_BLOCK = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python (or ```py) fenced block of ``text``; else its last bare ``` block; else the whole text."""
    blocks = CODE_BLOCK.findall(text)
    tagged = [body for tag, body in blocks if tag]
    return (tagged or [body for _, body in blocks] or [text])[-1]


class CodeTestsReward:
    """1.0 where the completion's code (:func:`extract_code`) passes the record's ``tests`` (a string of asserts) in
    a :class:`~rlfleet.sandbox.Sandbox`, else 0.0; the completions of a call run side by side in ``max_workers``
    threads (each in its own process).

    ``outcomes`` counts the sandbox's statuses (ok, failed, timeout, memory, killed, output_limit, error) over the
    life of the process. A run the sandbox itself could not start ("error") raises, so its groups are dropped and
    counted as reward errors rather than scored 0. ``preflight()`` raises ``ValueError`` when the sandbox cannot
    run here (``rlfleet train`` calls it before any actor starts).
    """

    def __init__(self, name: str, network: str = "none", limits: SandboxLimits = SandboxLimits(),
                 max_workers: int | None = None):
        self.__name__ = name
        self.network = network
        self.limits = limits
        self.max_workers = max_workers or os.cpu_count() or 1
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._sandbox: Sandbox | None = None

    def __getstate__(self) -> dict:  # sent to the reward worker process by value: counts and lock start afresh there
        return {"name": self.__name__, "network": self.network, "limits": self.limits, "max_workers": self.max_workers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:  # built on first use: importing rlfleet.rewards starts nothing
            self._sandbox = Sandbox(self.limits, self.network)
        return self._sandbox

    def preflight(self) -> None:
        try:
            self.sandbox.check()
        except SandboxUnavailable as err:
            allow = ("; or, to run it without a network namespace, name 'rlfleet.rewards:"
                     "code_tests_reward_allow_network' instead" if self.network == "none" else "")
            raise ValueError(f"algorithm.reward_funcs: {self.__name__}: {err}{allow}") from err

    def __call__(self, prompts, completions, completion_ids=None, *, tests, **kwargs) -> list[float]:
        self.sandbox.check()
        codes = [extract_code(final_text(c)) for c in completions]
        with ThreadPoolExecutor(min(self.max_workers, max(len(codes), 1))) as pool:
            results = list(pool.map(self.sandbox.run, codes, tests))
        with self._lock:
            self.outcomes.update(r.status for r in results)
        if failed := [r for r in results if r.status == "error"]:
            raise RuntimeError(f"{self.__name__}: the sandbox could not run {len(failed)} of {len(results)} "
                               f"programs: {failed[0].output.strip()[-300:]}")
        return [float(r.passed) for r in results]


code_tests_reward = CodeTestsReward("code_tests_reward")
# For platforms without network namespaces: the programs share the host's network. Naming it is the explicit choice.
code_tests_reward_allow_network = CodeTestsReward("code_tests_reward_allow_network", network="allow")
