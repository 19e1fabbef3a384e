"""Environments for multi-turn and tool-using episodes: the model speaks, the environment answers, the model speaks
again, and the reward functions judge the whole episode.

The protocol follows the ``verifiers`` library's multi-turn environments (``setup_state``, ``is_completed``,
``env_response``), with messages as TRL's conversational format (``{"role", "content"}`` dicts)::

    class Environment:
        tools = None                                   # tool schemas for the chat template, or None
        def setup_state(self, record) -> dict          # a new episode, from the dataset record
        def is_completed(self, messages, state) -> bool  # after each model turn: is the episode over?
        def env_response(self, messages, state) -> list[dict]  # else: the messages that answer the model

``messages`` is the whole conversation so far: the prompt's messages, then the turns (the model's
``{"role": "assistant", "content": ...}`` and the environment's messages). ``state`` is the episode's own dict;
keep everything about an episode there, because the methods of one environment object are called for many
episodes, from several threads at once. The episode ends when ``is_completed`` says so, or after
``generation.max_turns`` model turns, or when a model turn is cut by the length limit (the episode is truncated).

Configured by ``algorithm.environment`` (a built-in name or ``"package.module:Class"``) and
``algorithm.environment_kwargs`` (passed to the class). Reward functions keep TRL's signature; for an episode,
``completions[i]`` is the list of messages after the prompt (the model's and the environment's), so a reward
function judges the whole conversation. An environment that raises, takes longer than ``generation.env_timeout_s``
or returns something other than a non-empty list of messages ends its episode, and the episode's group is dropped
and counted in ``errors/env``.

Built-ins: :class:`ScriptedUser` (a user who answers each model turn from a list of replies; with the built-in
``char_count`` task the offline tiny model learns a multi-turn episode) and
:class:`~rlfleet.environments.calculator.Calculator` (a tool for Qwen-style tool calls, with a safe arithmetic
parser).
"""

from __future__ import annotations

import inspect
from typing import Any

from rlfleet.user_code import resolve_function


class Environment:
    """Base class of environments (subclassing is optional: any object with these methods will do)."""

    tools: list[dict] | None = None  # JSON schemas of the tools, passed to the chat template (``tools=``)

    def setup_state(self, record: dict) -> dict:
        """The state of a new episode for the dataset ``record`` (its columns, ``prompt`` included)."""
        return {"record": record}

    def is_completed(self, messages: list[dict], state: dict) -> bool:
        """Whether the episode ends after the model's last turn (``messages[-1]``)."""
        return False

    def env_response(self, messages: list[dict], state: dict) -> list[dict]:
        """The environment's messages (``role`` ``user`` or ``tool``, ``content`` a string) answering the model."""
        raise NotImplementedError


class ScriptedUser(Environment):
    """A user who answers the model's turn k with ``replies[k - 1]``, formatted with the record's columns
    (``"More {target}, please."``); the episode is over when the replies run out."""

    def __init__(self, replies: list[str]):
        if isinstance(replies, str) or not replies or not all(isinstance(r, str) for r in replies):
            raise ValueError(f"algorithm.environment_kwargs.replies: {replies!r} must be a non-empty list of strings")
        self.replies = list(replies)

    def is_completed(self, messages: list[dict], state: dict) -> bool:
        return sum(m["role"] == "assistant" for m in messages) > len(self.replies)

    def env_response(self, messages: list[dict], state: dict) -> list[dict]:
        turn = sum(m["role"] == "assistant" for m in messages)
        return [{"role": "user", "content": self.replies[turn - 1].format(**state["record"])}]


def _builtin_environments() -> dict[str, type]:
    from rlfleet.environments.calculator import Calculator

    return {"scripted_user": ScriptedUser, "calculator": Calculator}


def make_environment(spec: str, kwargs: dict[str, Any]) -> Any:
    """The environment named by ``algorithm.environment`` (``spec``), built with ``algorithm.environment_kwargs``.

    Raises ``ValueError`` naming the field: unknown name, import failure, missing methods, keyword arguments the
    class does not take, or a constructor that raised.
    """
    cls = resolve_function(spec, _builtin_environments(), "algorithm.environment")
    try:
        env = cls(**kwargs)
    except TypeError as err:
        try:
            signature = f"{getattr(cls, '__name__', spec)}{inspect.signature(cls)}"
        except (TypeError, ValueError):
            signature = spec
        raise ValueError(f"algorithm.environment_kwargs: {kwargs!r} do not fit {signature}: {err}") from err
    except Exception as err:  # the user's constructor failed: named, with its error, rather than traced
        raise ValueError(f"algorithm.environment: {spec!r} failed while it was built with "
                         f"algorithm.environment_kwargs={kwargs!r}: {type(err).__name__}: {err}. Fix the class or its "
                         "keyword arguments; --debug shows the traceback.") from err
    missing = [m for m in ("setup_state", "is_completed", "env_response") if not callable(getattr(env, m, None))]
    if missing:
        raise ValueError(f"algorithm.environment: {spec!r} has no {', '.join(missing)}; an environment needs "
                         "setup_state, is_completed and env_response (see rlfleet.environments)")
    return env
