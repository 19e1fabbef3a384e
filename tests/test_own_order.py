"""A continuous generator's requests that follow its earlier ones (rlfleet.generation.own_order), without Ray: what
a follower waits for, and what it need not. A wait with nothing to release it must time out (a short timeout_s);
one whose predecessors have passed returns at once."""

import threading

import pytest

from rlfleet.generation.own_order import Floor, OwnOrder


def test_the_floor_advances_over_ordinals_seen_in_any_order_and_jumps_to_what_the_driver_heard_end():
    floor = Floor()
    floor.add(1)
    floor.add(2)
    assert floor.floor == 0  # 0 not yet
    floor.add(0)
    assert floor.floor == 3
    floor.add(5)
    floor.raise_to(4)  # 3 ended as the driver heard; 4 not: the floor stops at 4 (5 is above it)
    assert floor.floor == 4
    floor.add(4)
    assert floor.floor == 6
    floor.add(2)  # long passed: nothing changes
    assert floor.floor == 6


def test_a_follower_starts_only_once_every_earlier_request_has_sampled_its_last_token():
    order = OwnOrder(timeout_s=0.05)
    order.begin(0, 0, follows=False)
    order.begin(1, 0, follows=False)
    with pytest.raises(TimeoutError, match="request 2 follows.*request 0 has not sampled"):
        order.begin(2, 0, follows=True)
    order.sampled(1)
    with pytest.raises(TimeoutError, match="request 0 has not sampled"):
        order.begin(2, 0, follows=True)
    order.sampled(0)
    order.begin(2, 0, follows=True)  # both sampled: at once
    with pytest.raises(TimeoutError, match="request 0 has not handed on"):
        order.before_handing_on(2)  # sampled, not yet handed on
    order.finished(0)
    order.finished(1)
    order.before_handing_on(2)


def test_a_follower_waits_for_none_of_the_requests_the_driver_heard_end():
    """A restarted process sees request 7 first: the driver heard the end of every request below 5 (low), so only 5
    and 6, which it may still receive, are waited for."""
    order = OwnOrder(timeout_s=0.05)
    with pytest.raises(TimeoutError, match="request 5 has not sampled"):
        order.begin(7, 5, follows=True)
    order.finished(5)
    order.finished(6)
    order.begin(7, 5, follows=True)
    order.before_handing_on(7)


def test_a_failed_predecessor_releases_its_follower():
    """finished() is called whatever way a request ends: a follower of one that failed is not held."""
    order = OwnOrder(timeout_s=5.0)
    order.begin(0, 0, follows=False)
    started = threading.Event()

    def follower():
        order.begin(1, 0, follows=True)
        order.before_handing_on(1)
        started.set()

    thread = threading.Thread(target=follower)
    thread.start()
    order.finished(0)  # the request failed before sampling its last token
    thread.join(timeout=10.0)
    assert started.is_set()
