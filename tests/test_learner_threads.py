"""cluster.learner_threads: the rule ``auto`` uses to borrow the node's cores, and the thread counts it applies."""

from __future__ import annotations

import pytest
import torch

from rlfleet.learner.threads import BORROW_BELOW, RETURN_ABOVE, WINDOW, LearnerThreads, choose_threads


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """torch's own set_num_threads: a vLLM CPU engine started in this process by an earlier module replaces it with
    a no-op for the rest of the process (vllm/v1/worker/cpu_worker.py). A learner actor's process holds no engine."""
    monkeypatch.setattr(torch, "set_num_threads", torch._C.set_num_threads)
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_choose_threads_borrows_when_the_learner_barely_waits_and_returns_when_it_waits_much():
    own, node = 1, 4
    assert choose_threads(0.0, own, own, node) == node  # never waited: the learner is the slow stage
    assert choose_threads(0.049, own, own, node) == node
    assert choose_threads(0.5, node, own, node) == own  # waited half its time: generation is the slow stage
    assert choose_threads(0.151, node, own, node) == own
    # between the thresholds nothing changes, whichever it has: a balanced job does not switch every window
    for share in (BORROW_BELOW, 0.1, RETURN_ABOVE):
        assert choose_threads(share, own, own, node) == own
        assert choose_threads(share, node, own, node) == node


def test_auto_decides_once_per_window_from_the_window_s_waits_and_applies_it():
    threads = LearnerThreads("auto", own=1, node=3)
    assert threads.threads == 1 and torch.get_num_threads() == 1  # it starts on its own CPUs
    threads.observe(0.0, 1.0)  # the first step is left out (its wait is the engines' start)
    for _ in range(WINDOW - 1):
        threads.observe(0.0, 1.0)
    assert torch.get_num_threads() == 1  # no decision before a whole window
    threads.observe(0.0, 1.0)
    assert threads.threads == 3 and torch.get_num_threads() == 3
    # a window of 0.1 s waits in 1 s steps: 0.1 / 1.1 = 9%, between the thresholds: it keeps the node's cores
    for _ in range(WINDOW):
        threads.observe(0.1, 1.0)
    assert torch.get_num_threads() == 3
    # one long wait (3 s) in a window of 4 s of training: 3 / 7 = 43% waiting: the cores go back
    threads.observe(3.0, 1.0)
    for _ in range(WINDOW - 1):
        threads.observe(0.0, 1.0)
    assert threads.threads == 1 and torch.get_num_threads() == 1


def test_fixed_and_default_settings_never_change():
    torch.set_num_threads(1)
    fixed = LearnerThreads(2, own=1, node=4)
    assert torch.get_num_threads() == 2
    for _ in range(3 * WINDOW):
        fixed.observe(0.0, 1.0)
    assert fixed.threads == 2 and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    default = LearnerThreads(None, own=1, node=4)
    for _ in range(3 * WINDOW):
        default.observe(0.0, 1.0)
    assert default.threads == 1 and torch.get_num_threads() == 1  # what Ray set
