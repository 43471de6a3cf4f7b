"""The durable queue on disk (layout and guarantees: mailrelay/spool/README.md).

Writing side (the SMTP session): create() -> IncomingMessage.write()* -> commit().
Reading side (delivery, mailrelay-admin): plain blocking readers, cheap enough for the
admin tool and for startup; scan() runs them in the spool's threads for the
daemon. Changes that must be durable (commit, save_state, remove) go through one group
commit on a small dedicated thread pool, so a burst of hashing or DNS work on the
reactor's shared pool never delays a `250`.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.errors import StorageError
from mailrelay.files import fsync_dir, unlink_quietly, write_durably
from mailrelay.interfaces import ISpool
from mailrelay.model import Envelope
from mailrelay.spool.groupsync import GroupSync
from mailrelay.spool.incoming import SPILL_BYTES, IncomingMessage
from mailrelay.spool.queueid import QueueIds, is_queue_id
from mailrelay.spool.spares import Spares
from mailrelay.spool.state import DeliveryState

log = Logger()

# json.dumps with options builds an encoder on every call: one for every envelope.
_ENVELOPE_JSON = json.JSONEncoder(separators=(",", ":"))
PLACES = ("queue", "hold")  # where committed messages live
LOCK_FILE = "lock"  # held shared while a process uses the spool (transfer.py takes it whole)
DEFAULT_MIN_FREE_BYTES = 100 * 2**20
FREE_SPACE_AGE = 1.0  # seconds a free space reading stands for
MAX_HEADERS = 64 * 1024  # bytes of a message's header section that readers take


def read_headers(body: BinaryIO) -> bytes:
    """The header section of a spooled message (up to the blank line), bounded."""
    lines = []
    size = 0
    for line in body:
        if line in (b"\r\n", b"\n") or size + len(line) > MAX_HEADERS:
            break
        lines.append(line)
        size += len(line)
    return b"".join(lines)


@dataclass(frozen=True)
class Snapshot:
    """A committed message as read by someone other than the delivery process."""

    place: str  # "queue" or "hold"
    envelope: Envelope
    size: int  # bytes of the message, without the envelope line
    headers: bytes  # its header section (read_headers)


@implementer(ISpool)
class Spool(Service):
    """The spool under ``directory`` (tmp/, queue/, hold/, state/, spare/).

    ``min_free_bytes``: below this much free space new messages get `452 4.3.1`.
    ``threads``: size of the spool's own thread pool (group commit, state writes, readers
    run for the daemon); it bounds how many file fsyncs run at once.

    As a twisted Service, startService() opens the spool and stopService() waits for the
    commits in flight, then stops the threads. mailrelay-admin uses the blocking readers
    and delete() without opening (open() would remove the daemon's messages in tmp/).

    ``owner``: the relay owns the spool and cleans up after a crash when it opens it; the
    delivery process (``owner=False``) shares it and only starts its threads, and its
    queue ids come from a lane of their own. ``node`` (spool/node.py) ends every queue id
    made here.
    """

    name = "spool"

    def __init__(self, directory: str, reactor=None,
                 min_free_bytes: int = DEFAULT_MIN_FREE_BYTES, threads: int = 4,
                 owner: bool = True, node: str = "") -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.directory = directory
        self.min_free_bytes = min_free_bytes
        self.owner = owner
        self._reactor = reactor
        self._ids = QueueIds(reactor.seconds, lane=0 if owner else 1, node=node)
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="spool")
        self._sync = GroupSync(reactor, self._pool)
        self.spares = Spares(self._dir("spare"), max_bytes=SPILL_BYTES)
        self._subscribers: list[Callable[[Envelope], None]] = []
        self._free: tuple[float, int] | None = None  # (when, free_bytes()) for create()
        self._lock: int | None = None  # the lock file, while open

    # -- lifecycle

    def open(self) -> None:
        """Create the directories, remove what a crash left behind, start the threads.

        Reads no message: two listdirs and set arithmetic, fast at 100,000 messages.
        A spool opened by another owner (``owner=False``) is only used, never cleaned.
        """
        for place in ("tmp", "queue", "hold", "state", "spare"):
            os.makedirs(self._dir(place), mode=0o700, exist_ok=True)
        self._take_lock()
        if not self.owner:
            self._pool.start()
            return
        stale = os.listdir(self._dir("tmp"))
        for name in stale:
            unlink_quietly(os.path.join(self._dir("tmp"), name))
        self.spares.clear()
        queued = set(os.listdir(self._dir("queue")))
        # remove() unlinks the message first: a crash between leaves its state behind.
        orphans = [n for n in os.listdir(self._dir("state"))
                   if n.endswith(".json") and n[:-5] not in queued]
        for name in orphans:
            unlink_quietly(os.path.join(self._dir("state"), name))
        log.info("spool {directory}: {queued} queued, {held} held; removed {stale} stale "
                 "tmp files, {orphans} orphaned state files", directory=self.directory,
                 queued=len(queued), held=len(os.listdir(self._dir("hold"))),
                 stale=len(stale), orphans=len(orphans))
        self._pool.start()

    def close(self) -> Deferred:
        """Wait for the durable changes in flight, then stop the threads."""
        def stop(_) -> None:
            self._pool.stop()
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

        return self._sync.drain().addCallback(stop)

    def _take_lock(self) -> None:
        """Shared with the other process of this node; it tells `queue import` on another
        node that this spool is in use (a lock that dies with the process, even kill -9)."""
        fd = os.open(os.path.join(self.directory, LOCK_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"{self.directory} is being imported by another node "
                               "(mailrelay-admin queue import)", full=False) from None
        self._lock = fd

    def startService(self) -> None:
        self.open()
        super().startService()

    def stopService(self) -> Deferred:
        super().stopService()
        return self.close()

    @property
    def dir_syncs(self) -> int:
        """Directory fsyncs done so far (group commit makes this far fewer than commits)."""
        return self._sync.dir_syncs

    @property
    def batches(self) -> int:
        return self._sync.batches

    # -- writing side

    def subscribe(self, callback: Callable[[Envelope], None]) -> None:
        """Call ``callback(envelope)`` for every message committed to queue/ (not hold/),
        once it is durable and before the client hears 250: delivery's new-mail signal."""
        self._subscribers.append(callback)

    def announce(self, envelope: Envelope) -> None:
        """Tell the subscribers of a message that entered queue/ other than by a commit:
        a held message released (release())."""
        self._committed(envelope)

    def _committed(self, envelope: Envelope) -> None:
        for callback in self._subscribers:
            try:
                callback(envelope)
            except Exception:
                log.failure("subscriber failed for {queue_id}", queue_id=envelope.id)

    def create(self, envelope: Envelope) -> IncomingMessage:
        """Start a message; fills ``envelope.id`` when empty. Raises StorageError (full)
        when free space is below min_free_bytes (checked at most once a second); a file
        that cannot be made fails the message's commit()."""
        free = self._recent_free_bytes()
        if free < self.min_free_bytes:
            log.warn("refusing a message: {free} bytes free in {directory}, below "
                     "{minimum}", free=free, directory=self.directory,
                     minimum=self.min_free_bytes)
            raise StorageError(f"{free} bytes free, below min_free_bytes", full=True)
        if not envelope.id:
            envelope.id = self._ids.next(envelope.priority)
        elif not is_queue_id(envelope.id) or self.locate(envelope.id) is not None:
            raise ValueError(f"not a new queue id: {envelope.id!r}")
        tmp_path = os.path.join(self._dir("tmp"), envelope.id)
        # Held: a sandboxed user's mail (never delivered), or mail over a quota
        # (released when it resets: policy/quotahold.py).
        held = envelope.sandboxed or envelope.held_until is not None
        line = _ENVELOPE_JSON.encode(envelope.to_json()).encode() + b"\n"
        final_path = os.path.join(self._dir("hold" if held else "queue"), envelope.id)
        notify = None if held else self._committed
        return IncomingMessage(envelope, line, tmp_path, final_path, self._sync,
                               self.spares, notify)

    def submit(self, envelope: Envelope, data: bytes) -> Deferred:
        """Queue a whole message the relay made itself (DSN, notification): create, write,
        commit. Fires with the queue id once durable."""
        incoming = self.create(envelope)
        incoming.write(data)
        return incoming.commit()

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def _recent_free_bytes(self) -> int:
        """free_bytes() as of at most FREE_SPACE_AGE seconds ago: a statvfs per message
        would cost more than the room it could find missing in a second."""
        now = self._reactor.seconds()
        if self._free is None or now - self._free[0] >= FREE_SPACE_AGE or now < self._free[0]:
            self._free = (now, self.free_bytes())
        return self._free[1]

    # -- reading side (blocking: call them from a thread; scan() does, for startup)

    def queued(self) -> list[str]:
        """Ids in queue/, in delivery order: priority, then age. No file is read."""
        return self._list("queue")

    def held(self) -> list[str]:
        """Ids in hold/ (sandboxed users' mail, never delivered, and mail held over a
        quota), oldest first."""
        return self._list("hold")

    def held_envelope(self, queue_id: str) -> Envelope:
        """The envelope of a message in hold/; KeyError when it is not there."""
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            with open(os.path.join(self._dir("hold"), queue_id), "rb") as f:
                return Envelope.from_json(json.loads(f.readline()))
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def tried(self) -> set[str]:
        """Ids with a delivery state (tried at least once, or partly sent). No file is
        read."""
        return {n[:-5] for n in os.listdir(self._dir("state")) if n.endswith(".json")}

    def locate(self, queue_id: str) -> str | None:
        """"queue", "hold", or None for an unknown (or malformed) id."""
        if is_queue_id(queue_id):
            for place in PLACES:
                if os.path.exists(os.path.join(self._dir(place), queue_id)):
                    return place
        return None

    def path(self, queue_id: str) -> str:
        """The message file; KeyError for an unknown id."""
        place = self.locate(queue_id)
        if place is None:
            raise KeyError(queue_id)
        return os.path.join(self._dir(place), queue_id)

    def envelope(self, queue_id: str) -> Envelope:
        """The envelope (line 1 of the file); KeyError for an unknown id. For the delivery
        process, which alone removes queued messages; anyone else reads snapshot()."""
        with self._open(queue_id) as f:
            return Envelope.from_json(json.loads(f.readline()))

    def open_body(self, queue_id: str) -> BinaryIO:
        """The message file positioned at the body (the caller closes it). For the
        delivery process, as envelope()."""
        f = self._open(queue_id)
        f.readline()
        return f

    def snapshot(self, queue_id: str) -> Snapshot:
        """Envelope, size and header section of a committed message, read at once, for
        readers outside the delivery process (queue list and show, the panel); KeyError
        when it is not in queue/ or hold/, or left while it was read.

        A delivered message's file may become a spare and be written over by a new
        message while a reader holds it open (spares.py). What was read counts only if
        the message's name still leads to the file read afterwards: a file is written
        once before it gets a queue name and its name is never given again, so then the
        bytes were this message's; otherwise they are dropped, never shown as its.
        """
        with self._open(queue_id) as f:
            line = f.readline()
            headers = read_headers(f)
            read = os.fstat(f.fileno())
        place = next((p for p in PLACES if self._is_file(p, queue_id, read)), None)
        if place is None:
            raise KeyError(queue_id)
        return Snapshot(place, Envelope.from_json(json.loads(line)),
                        read.st_size - len(line), headers)

    def read_state(self, queue_id: str) -> DeliveryState | None:
        """The delivery state, or None before the first attempt."""
        return self._read_state(os.path.join(self._dir("state"), f"{queue_id}.json"))

    def all_states(self) -> dict[str, DeliveryState]:
        """Every state file by id (for startup): reads state/ only."""
        states = {}
        for name in os.listdir(self._dir("state")):
            if name.endswith(".json") and is_queue_id(name[:-5]):
                state = self._read_state(os.path.join(self._dir("state"), name))
                if state is not None:
                    states[name[:-5]] = state
        return states

    def scan(self) -> Deferred:
        """In a spool thread: fires with (queued(), all_states()) for startup."""
        return self._in_thread(lambda: (self.queued(), self.all_states()))

    # -- durable changes after the commit

    def save_state(self, queue_id: str, state: DeliveryState) -> Deferred:
        """Replace the state file atomically (group-committed); fires with None once
        durable. Callers keep one save per message in flight at a time."""
        tmp_path, final_path, data = self._state_write(queue_id, state)

        def apply() -> tuple[str]:
            write_durably(tmp_path, final_path, data)
            return (self._dir("state"),)

        return self._sync.submit(apply)

    def write_state(self, queue_id: str, state: DeliveryState) -> None:
        """Blocking save_state, for mailrelay-admin."""
        write_durably(*self._state_write(queue_id, state))
        fsync_dir(self._dir("state"))

    def remove(self, queue_id: str) -> Deferred:
        """Delivery is over: queue/<id> goes (kept as a spare when small: spares.py), then
        its state (group-committed)."""
        def apply() -> list[str]:
            changed = []
            path = os.path.join(self._dir("queue"), queue_id)
            if self.spares.keep(path) or unlink_quietly(path):
                changed.append(self._dir("queue"))
            if unlink_quietly(os.path.join(self._dir("state"), f"{queue_id}.json")):
                changed.append(self._dir("state"))
            return changed

        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        # Not logged: delivery logs each recipient's outcome; twistd writes debug lines
        # too, and this one came once per message.
        return self._sync.submit(apply, waits=False)

    def release(self, queue_id: str) -> None:
        """Blocking (the relay runs it in a thread): move a held message from hold/ into
        queue/, durably; then announce() it to delivery. KeyError when it is not in hold/.
        A rename: the message is in one place or the other whenever the relay stops."""
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            os.rename(os.path.join(self._dir("hold"), queue_id),
                      os.path.join(self._dir("queue"), queue_id))
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        fsync_dir(self._dir("queue"))
        fsync_dir(self._dir("hold"))
        log.info("released {queue_id} from hold to the queue", queue_id=queue_id)

    def delete(self, queue_id: str) -> str:
        """Blocking, for mailrelay-admin: remove a message from queue/ or hold/ with its
        state. Returns where it was; KeyError for an unknown id."""
        place = self.locate(queue_id)
        if place is None or not unlink_quietly(os.path.join(self._dir(place), queue_id)):
            raise KeyError(queue_id)
        fsync_dir(self._dir(place))
        if unlink_quietly(os.path.join(self._dir("state"), f"{queue_id}.json")):
            fsync_dir(self._dir("state"))
        log.info("deleted {queue_id} from {place}", queue_id=queue_id, place=place)
        return place

    # -- helpers

    def _dir(self, place: str) -> str:
        return os.path.join(self.directory, place)

    def _list(self, place: str) -> list[str]:
        return sorted(n for n in os.listdir(self._dir(place)) if is_queue_id(n))

    def _open(self, queue_id: str) -> BinaryIO:
        if is_queue_id(queue_id):
            for place in PLACES:
                try:
                    return open(os.path.join(self._dir(place), queue_id), "rb")
                except FileNotFoundError:
                    continue
        raise KeyError(queue_id)

    def _is_file(self, place: str, queue_id: str, st: os.stat_result) -> bool:
        try:
            now = os.stat(os.path.join(self._dir(place), queue_id))
        except OSError:
            return False
        return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)

    def _read_state(self, path: str) -> DeliveryState | None:
        try:
            with open(path, "rb") as f:
                return DeliveryState.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, AttributeError) as err:  # never written by us
            log.warn("ignoring unreadable state file {path}: {error}", path=path, error=err)
            return None

    def _state_write(self, queue_id: str, state: DeliveryState) -> tuple[str, str, bytes]:
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        # A unique temporary name in tmp/: stale ones go with the rest at open().
        tmp_path = os.path.join(self._dir("tmp"), f"{queue_id}.state-{secrets.token_hex(4)}")
        final_path = os.path.join(self._dir("state"), f"{queue_id}.json")
        return tmp_path, final_path, json.dumps(state.to_json()).encode()

    def _in_thread(self, f) -> Deferred:
        return deferToThreadPool(self._reactor, self._pool, f)
