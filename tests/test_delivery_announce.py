"""The relay announces committed messages to its delivery process: one after a quiet spell
goes at once, a steady flow goes in batches of ANNOUNCE_WINDOW."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailrelay.delivery.commands import Enqueue
from mailrelay.delivery.process import ANNOUNCE_WINDOW, DeliveryProcess


class RecordingChannel:
    """Stands for the AMP channel to a running delivery process."""

    def __init__(self) -> None:
        self.announced: list[list[str]] = []

    def callRemote(self, command, **kw):
        assert command is Enqueue
        self.announced.append(list(kw["ids"]))


def running(clock: Clock) -> tuple[DeliveryProcess, RecordingChannel]:
    process = DeliveryProcess(["/bin/false"], clock)
    channel = RecordingChannel()
    process._channel = channel  # as _spawn leaves it once the process runs
    return process, channel


def test_a_message_after_a_quiet_spell_is_announced_at_once():
    clock = Clock()
    clock.advance(100)
    process, channel = running(clock)
    process.enqueue("a")
    process.enqueue("b")  # committed in the same reactor turn
    clock.advance(0)
    assert channel.announced == [["a", "b"]]


def test_a_steady_flow_is_announced_in_batches():
    clock = Clock()
    clock.advance(100)
    process, channel = running(clock)
    process.enqueue("a")
    clock.advance(0)
    for queue_id in "bcd":
        clock.advance(ANNOUNCE_WINDOW / 5)
        process.enqueue(queue_id)
    assert channel.announced == [["a"]]  # b, c, d wait for the window to end
    clock.advance(ANNOUNCE_WINDOW)
    assert channel.announced == [["a"], ["b", "c", "d"]]
    clock.advance(10 * ANNOUNCE_WINDOW)
    process.enqueue("e")
    clock.advance(0)
    assert channel.announced[-1] == ["e"]


def test_nothing_waits_once_the_service_stops():
    clock = Clock()
    process, channel = running(clock)
    process.startService = lambda: None  # no real process: only the timer matters here
    process.running = True
    process.enqueue("a")
    process.stopService()
    assert clock.getDelayedCalls() == []
    assert channel.announced == []
