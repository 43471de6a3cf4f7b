"""Taking over the spool of a node that died: ``mailrelay-admin queue import DIR``.

Every committed message of the other spool (queue/ and hold/, with its state file) moves
into this one. Blocking: the admin tool runs it, beside the running relay, which takes no
part until it is told of the new messages (or next starts).

Exactly once, even when the import is interrupted and run again: a message goes
  1. copied (with its state) into this spool's ``import/`` (a staging place nothing else
     reads or cleans), fsynced;
  2. removed from the other spool (state first, then message), its directories fsynced:
     from this point the staged copy is the message;
  3. renamed from ``import/`` into ``queue/`` or ``hold/`` (state into ``state/``).
A run first lands what an interrupted one staged whose source is gone (step 3), and copies
again what it staged whose source is still there (step 1). Ids end with the node id that
made them, so an imported message never takes the name of one of this node's; an id
already here is left where it is, and reported.

``tmp/`` of the other spool holds only messages that were never acknowledged (their client
got no 250 and sends them again): they are not imported, only counted.

The other spool must be out of use: ``lock()`` takes its lock file exclusively, which a
relay or delivery process that has it open holds shared (Spool.open); it is held for the
whole import, so the other node cannot start meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

from mailrelay.files import FILE_MODE, create_exclusive, fsync_dir, unlink_quietly
from mailrelay.spool.queueid import is_queue_id
from mailrelay.spool.spool import LOCK_FILE, PLACES, Spool

STAGE = "import"


class SpoolInUse(Exception):
    """A relay or its delivery process still has the other spool open."""


@dataclass
class Imported:
    queued: list[str] = field(default_factory=list)  # now in this node's queue/
    held: list[str] = field(default_factory=list)  # now in hold/
    present: list[str] = field(default_factory=list)  # already here: left in the source
    uncommitted: int = 0  # files in the source's tmp/: never acknowledged, not imported

    def to_json(self) -> dict:
        return {"queued": self.queued, "held": self.held, "already_present": self.present,
                "uncommitted": self.uncommitted}


def spool_directory(path: str) -> str:
    """The spool in ``path``: a data_dir (with spool/ in it) or a spool directory itself.
    ValueError when neither."""
    for candidate in (os.path.join(path, "spool"), path):
        if all(os.path.isdir(os.path.join(candidate, p)) for p in PLACES):
            return os.path.abspath(candidate)
    raise ValueError(f"{path}: no spool there (neither queue/ and hold/ nor spool/queue/)")


@contextlib.contextmanager
def lock(directory: str) -> Iterator[None]:
    """Hold the spool in ``directory`` exclusively; SpoolInUse when a process uses it."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolInUse(f"{directory} is in use: its relay (or delivery process) is "
                             "still running") from None
        yield
    finally:
        os.close(fd)


def import_spool(source: Spool, target: Spool, dry_run: bool = False) -> Imported:
    """Move every committed message of ``source`` into ``target`` (see above). The caller
    holds lock(source.directory)."""
    if os.path.samefile(source.directory, target.directory):
        raise ValueError(f"{source.directory} is this node's own spool")
    done = Imported(uncommitted=sum(
        1 for n in os.listdir(os.path.join(source.directory, "tmp")) if is_queue_id(n)))
    stage = _Stage(os.path.join(target.directory, STAGE), target)
    found = [(place, queue_id) for place in PLACES for queue_id in source._list(place)]
    for _place, queue_id in found:
        if target.locate(queue_id) is not None:
            done.present.append(queue_id)
    if dry_run:
        for place, queue_id in found:
            if queue_id not in done.present:
                (done.queued if place == "queue" else done.held).append(queue_id)
        return done
    stage.open()
    # An interrupted run: what it staged and then removed from the source is landed now.
    landing = [(place, queue_id) for place, queue_id in stage.staged()
               if source.locate(queue_id) is None]
    moving = [(place, queue_id) for place, queue_id in found
              if queue_id not in done.present]
    for place, queue_id in moving:  # 1. copy
        stage.copy(source, place, queue_id)
    stage.sync()
    changed = set()
    for place, queue_id in moving:  # 2. the hand-over
        if unlink_quietly(os.path.join(source.directory, "state", f"{queue_id}.json")):
            changed.add("state")
        os.unlink(os.path.join(source.directory, place, queue_id))
        changed.add(place)
    for place in sorted(changed):
        fsync_dir(os.path.join(source.directory, place))
    for place, queue_id in landing + moving:  # 3. land
        stage.land(place, queue_id)
        (done.queued if place == "queue" else done.held).append(queue_id)
    stage.sync_target()
    return done


class _Stage:
    """``<spool>/import/``: queue/, hold/ and state/ as in a spool, for messages on their
    way in."""

    def __init__(self, directory: str, target: Spool) -> None:
        self.directory = directory
        self.target = target

    def _path(self, place: str, name: str) -> str:
        return os.path.join(self.directory, place, name)

    def open(self) -> None:
        for place in (*PLACES, "state"):
            os.makedirs(os.path.join(self.directory, place), mode=0o700, exist_ok=True)

    def staged(self) -> list[tuple[str, str]]:
        return [(place, name) for place in PLACES
                for name in sorted(os.listdir(os.path.join(self.directory, place)))
                if is_queue_id(name)]

    def copy(self, source: Spool, place: str, queue_id: str) -> None:
        """Stage the message and its state (when it has one), each fsynced."""
        _copy(os.path.join(source.directory, place, queue_id), self._path(place, queue_id))
        state = os.path.join(source.directory, "state", f"{queue_id}.json")
        if os.path.exists(state):
            _copy(state, self._path("state", f"{queue_id}.json"))

    def sync(self) -> None:
        for place in (*PLACES, "state"):
            fsync_dir(os.path.join(self.directory, place))

    def land(self, place: str, queue_id: str) -> None:
        """State first: delivery, once it sees the message, must find what was sent."""
        state = self._path("state", f"{queue_id}.json")
        if os.path.exists(state):
            os.rename(state, os.path.join(self.target.directory, "state", f"{queue_id}.json"))
        os.rename(self._path(place, queue_id),
                  os.path.join(self.target.directory, place, queue_id))

    def sync_target(self) -> None:
        for place in (*PLACES, "state"):
            fsync_dir(os.path.join(self.target.directory, place))


def _copy(path: str, final_path: str) -> None:
    """``path`` to ``final_path`` (replaced), written under a temporary name and fsynced."""
    part = final_path + ".part"
    unlink_quietly(part)  # left by an interrupted run
    with open(path, "rb") as src, create_exclusive(part) as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)
        dst.flush()
        os.fsync(dst.fileno())
    os.rename(part, final_path)
