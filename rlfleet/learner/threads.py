"""``cluster.learner_threads``: the learner's torch threads on CPU, fixed, or chosen from its own waits (``auto``).

On a CPU node the generators and the learner share the cores. Which stage is the slow one decides what a second
learner thread is worth (bench/RESULTS.md sections 2c, 2d and 11, on 2 cores):

- the learner is the slow stage: the generators sit idle (staleness-bound) for much of each step, and a learner
  borrowing their cores steps 8-10% faster;
- generation is the slow stage: the learner's extra thread takes the core the engine needs, 1.3-1.4x slower steps.

``auto`` tells them apart by what the learner measures itself: how long it waited for the replay actor to have a
batch, against how long it trained. A learner that has not waited (less than ``BORROW_BELOW`` of its time over the
last ``WINDOW`` steps; the first step of its life is left out, as its wait is the engines' start) is the slow stage
and takes every core of its node; one that waits more than ``RETURN_ABOVE`` gives them back. The gap between the
two thresholds keeps a balanced job from switching every window.
"""

from __future__ import annotations

import os
import torch

WINDOW = 2  # train steps per decision (after the first step, whose wait is the engines' start)
BORROW_BELOW = 0.05  # share of the window's time spent waiting for a batch below which the learner borrows
RETURN_ABOVE = 0.15  # ... above which it gives the borrowed cores back


def set_threads(threads: int | None) -> None:
    """This process's torch threads (None keeps what Ray set: the actor's CPUs)."""
    if threads is not None:
        torch.set_num_threads(threads)


def node_cores() -> int:
    """The cores this process may run on (its CPU affinity): an upper bound for any thread count here."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(wait_share: float, current: int, own: int, node: int) -> int:
    """The learner's threads for the next window, given the share of the last window it spent waiting for a batch:
    ``node`` (borrowing) when it barely waited, ``own`` when it waited much, ``current`` in between."""
    if wait_share < BORROW_BELOW:
        return node
    if wait_share > RETURN_ABOVE:
        return own
    return current


class LearnerThreads:
    """The learner actor's side of ``cluster.learner_threads``. ``setting``: a number (fixed), None (the actor's
    CPUs, as Ray set them) or ``"auto"``; ``own``: the actor's CPUs; ``node``: the cores it may borrow up to."""

    def __init__(self, setting: int | str | None, own: int, node: int):
        self.auto = setting == "auto"
        self.own, self.node = max(own, 1), max(node, own, 1)
        self.current = self.own if self.auto else setting
        set_threads(self.current)
        self.window: list[tuple[float, float]] = []  # (wait, busy) of the steps since the last decision
        self.first = True

    @property
    def threads(self) -> int:
        return self.current or torch.get_num_threads()

    def observe(self, wait_s: float, busy_s: float) -> None:
        """One train step: ``wait_s`` waiting for its batch, ``busy_s`` training and publishing. With ``auto``, every
        ``WINDOW`` steps the threads are chosen again (:func:`choose_threads`)."""
        if not self.auto or self.first:
            self.first = False
            return
        self.window.append((wait_s, busy_s))
        if len(self.window) < WINDOW:
            return
        wait, total = sum(w for w, _ in self.window), sum(w + b for w, b in self.window)
        threads = choose_threads(wait / total if total > 0 else 0.0, self.current, self.own, self.node)
        self.window = []
        if threads != self.current:
            self.current = threads
            set_threads(threads)
