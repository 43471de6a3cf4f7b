"""Queue ids: `<priority digit><11 hex of unix ms><6 hex><node id>`, so that sorting names
sorts the queue by priority, then age, without reading any file; the node id (4 base32hex
characters, ``[server] node_id``) keeps the ids of several nodes apart, so one node's spool
can be imported into another's (spool/transfer.py). Ids made before node ids existed have
no node part and are still read."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

NODE_RE = re.compile(r"[0-9a-v]{4}")  # lowercase base32hex: sorts as it reads
ID_RE = re.compile(r"[1-9][0-9a-f]{17}(?:[0-9a-v]{4})?")
_LANE = 0x800000  # the six digits hold two lanes of this many ids per millisecond
LANES = 2


def is_queue_id(name: str) -> bool:
    return ID_RE.fullmatch(name) is not None


def is_node_id(text: str) -> bool:
    return NODE_RE.fullmatch(text) is not None


def node_of(queue_id: str) -> str:
    """The node that made the id; "" for an id older than node ids."""
    return queue_id[18:]


def priority_of(queue_id: str) -> int:
    return int(queue_id[0])


def time_of(queue_id: str) -> float:
    """The unix time (seconds) the id was made."""
    return int(queue_id[1:12], 16) / 1000


class QueueIds:
    """Makes ids that are unique and increasing within a process.

    The last six digits start at a random value each millisecond and count up for more ids
    in the same millisecond, so a burst never collides and keeps its order; the random
    start keeps ids from two runs of the daemon apart. The time never goes backwards, even
    when the clock does. ``lane`` (0 or 1) gives each of two processes writing the same
    spool (the relay and its delivery process) its own half of the digits, so their ids
    never meet. ``node`` ends every id, so two nodes' ids never meet either.
    """

    def __init__(self, now: Callable[[], float], lane: int = 0, node: str = "") -> None:
        if not 0 <= lane < LANES:
            raise ValueError(f"lane must be 0 or 1, not {lane!r}")
        if node and not is_node_id(node):
            raise ValueError(f"not a node id (4 of 0-9a-v): {node!r}")
        self._node = node
        self._now = now
        # Seeded once from the OS: the random start only keeps two runs' ids apart, and
        # asking the OS for it at every millisecond cost more than the rest of next().
        self._random = random.Random()
        self._base = lane * _LANE
        self._ms = 0
        self._seq = 0

    def next(self, priority: int) -> str:
        if not 1 <= priority <= 9:
            raise ValueError(f"priority must be a digit 1-9, not {priority!r}")
        ms = int(self._now() * 1000)
        if ms > self._ms:
            self._ms, self._seq = ms, self._random.randrange(_LANE // 2)
        elif self._seq < _LANE - 1:
            self._seq += 1
        else:  # 8 million ids in one millisecond: borrow the next one
            self._ms, self._seq = self._ms + 1, 0
        return f"{priority}{self._ms:011x}{self._base + self._seq:06x}{self._node}"
