"""Request order (rlfleet.replay.order.RequestOrder): deliveries released in the order their requests were made."""

from __future__ import annotations

import random

from rlfleet.replay.order import RequestOrder


def test_a_later_request_waits_for_every_earlier_one():
    order: RequestOrder[str] = RequestOrder()
    assert order.deliver(1, ["b1", "b2"]) == [] and order.held == 2
    assert order.deliver(2, []) == []  # every group of request 2 was dropped: it still ends
    assert order.deliver(0, ["a"]) == ["a", "b1", "b2"] and order.held == 0 and order.next_seq == 3
    assert order.deliver(3, ["d"]) == ["d"]


def test_a_skipped_request_releases_the_later_ones_and_the_first_word_wins():
    order: RequestOrder[str] = RequestOrder()
    assert order.deliver(1, ["b"]) == []
    assert order.skip(0) == ["b"]
    assert order.deliver(0, ["late"]) == [] and order.ignored == 1  # its add raced the driver's notice of its loss
    assert order.deliver(3, ["d"]) == [] and order.skip(3) == [] and order.ignored == 2  # a second word on 3
    assert order.deliver(2, ["c"]) == ["c", "d"]


def test_any_order_of_ends_releases_every_item_once_in_request_order():
    for seed in range(50):
        rng = random.Random(seed)
        n = rng.randint(1, 30)
        items = {seq: [f"{seq}.{j}" for j in range(rng.randint(0, 3))] for seq in range(n)}
        lost = {seq for seq in range(n) if rng.random() < 0.2}
        order: RequestOrder[str] = RequestOrder()
        released = []
        for seq in rng.sample(range(n), n):
            released += order.skip(seq) if seq in lost else order.deliver(seq, items[seq])
        assert released == [x for seq in range(n) if seq not in lost for x in items[seq]]
        assert order.held == 0 and order.next_seq == n
