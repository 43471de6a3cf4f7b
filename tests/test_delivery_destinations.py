"""Connection slots per destination and in all, without a network: ``connect`` records
the connections the destinations would open, and the test closes them."""

from __future__ import annotations

from mailrelay.delivery.client import Job
from mailrelay.delivery.destinations import SPREAD, Destinations


def job(queue_id: str) -> Job:
    return Job(queue_id, "s@a.test", ["r@b.test"], lambda: None)


class Opened:
    def __init__(self, max_per_host: int, max_concurrency: int) -> None:
        self.open: list = []
        self.destinations = Destinations(self.open.append, max_per_host=max_per_host,
                                         max_concurrency=max_concurrency)
        self.destinations.running = True

    def close(self, dest) -> None:
        self.open.remove(dest)
        self.destinations.closed(dest)
        self.destinations.settle(dest)


def test_one_connection_then_one_more_per_spread_jobs_up_to_max_per_host():
    o = Opened(max_per_host=3, max_concurrency=50)
    key = frozenset(["mx"])
    opened_at = []
    for i in range(1, SPREAD * 5):
        o.destinations.add(key, ["mx"], job(f"3{i:017d}"))
        if len(o.open) > len(opened_at):
            opened_at.append(i)
    # nothing is taken meanwhile: a second connection once more than SPREAD jobs wait
    # for the first, a third past 2 * SPREAD; then the cap
    assert opened_at == [1, SPREAD + 1, 2 * SPREAD + 1]
    assert [d.active for d in o.destinations] == [3]


def test_jobs_leave_in_queue_id_order():
    o = Opened(max_per_host=1, max_concurrency=1)
    key = frozenset(["mx"])
    for queue_id in ["3b", "1z", "3a"]:
        o.destinations.add(key, ["mx"], job(queue_id))
    [dest] = o.open
    assert [dest.pop().queue_id for _ in range(3)] == ["1z", "3a", "3b"]
    assert dest.pop() is None


def test_the_backlog_takes_a_freed_slot_and_a_finished_destination_is_forgotten():
    o = Opened(max_per_host=10, max_concurrency=1)
    first, second = frozenset(["mx1"]), frozenset(["mx2"])
    o.destinations.add(first, ["mx1"], job("3a"))
    o.destinations.add(second, ["mx2"], job("3b"))
    [dest1] = o.open  # the one slot
    assert o.destinations.connections == 1
    dest1.pop()
    o.close(dest1)
    [dest2] = o.open  # the second destination got it
    assert dest2.key == second and o.destinations.connections == 1
    assert [d.key for d in o.destinations] == [second]


def test_nothing_opens_while_stopped():
    o = Opened(max_per_host=10, max_concurrency=10)
    o.destinations.running = False
    o.destinations.add(frozenset(["mx"]), ["mx"], job("3a"))
    assert o.open == [] and o.destinations.connections == 0
