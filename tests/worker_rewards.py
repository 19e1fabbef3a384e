"""Reward functions for tests/test_reward_worker.py, in a module of their own: the worker process imports it, and it
imports nothing heavy (a worker starts in a fraction of a second)."""

from __future__ import annotations

import asyncio
import os
import threading


def length_reward(prompts, completions, completion_ids=None, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def hang_on_mode(prompts, completions, completion_ids=None, *, mode, **kwargs):
    """Never returns when a record's mode is "hang" (as a reward blocked on a dead server); exits its process on
    "exit" (as a segfault in an extension would); else 1.0."""
    if "exit" in mode:
        os._exit(7)
    if "hang" in mode:
        threading.Event().wait()
    return [1.0] * len(completions)


GATE: dict = {}


async def meet(prompts, completions, completion_ids=None, *, meet_count, **kwargs):
    """Returns only once ``meet_count`` calls are in flight in this process at once: a worker that awaited its calls
    one at a time would never see the second, and the first would time out."""
    if "event" not in GATE:
        GATE["event"], GATE["count"] = asyncio.Event(), 0
    GATE["count"] += 1
    if GATE["count"] >= meet_count[0]:
        GATE["event"].set()
    await GATE["event"].wait()
    return [2.0] * len(completions)


async def async_hang_on_mode(prompts, completions, completion_ids=None, *, mode, **kwargs):
    if "hang" in mode:
        await asyncio.Event().wait()
    return [3.0] * len(completions)


def hang_always(prompts, completions, completion_ids=None, **kwargs):
    """A reward function whose server never answers."""
    threading.Event().wait()


def exit_on_crash(prompts, completions, completion_ids=None, *, crash, **kwargs):
    """Takes its process down (as a segfault would) when a record's ``crash`` column is set; else 1.0."""
    if any(crash):
        os._exit(9)
    return [1.0] * len(completions)
