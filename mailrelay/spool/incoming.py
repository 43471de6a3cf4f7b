"""A message being received: held in memory, or for a large one written to `tmp/<id>`;
commit() makes it durable in the queue."""

from __future__ import annotations

import enum
import io
import os
from collections.abc import Callable
from typing import BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.errors import StorageError
from mailrelay.files import FILE_MODE, close_quietly, create_exclusive, unlink_quietly
from mailrelay.interfaces import IIncomingMessage
from mailrelay.model import Envelope
from mailrelay.spool.groupsync import GroupSync
from mailrelay.spool.spares import Spares

log = Logger()

# A message up to this size stays in memory until commit() (as much as the file's write
# buffer held anyway); a larger one goes on into tmp/ as it arrives.
SPILL_BYTES = 64 * 1024


class _Phase(enum.Enum):
    OPEN = "open"
    COMMITTING = "committing"  # handed to the group commit: its outcome decides
    COMMITTED = "committed"
    DISCARDED = "discarded"  # aborted, or a write or the commit failed: nothing kept


@implementer(IIncomingMessage)
class IncomingMessage:
    """The file is made, written, fsynced and renamed in the group commit's thread, so a
    small message costs the reactor no file system call at all. One larger than
    ``spill_bytes`` is created in tmp/ once it passes that size and its body goes to a
    buffered file on the reactor thread (page cache only)."""

    def __init__(self, envelope: Envelope, head: bytes, tmp_path: str, final_path: str,
                 committer: GroupSync, spares: Spares,
                 notify: Callable[[Envelope], None] | None = None,
                 spill_bytes: int = SPILL_BYTES) -> None:
        self.id = envelope.id
        self.envelope = envelope
        self.size = 0  # body bytes written so far
        self._head = head  # the envelope line the file starts with
        self._chunks: list[bytes] = [head]  # the file's content while in memory
        self._held = len(head)
        self._spill_bytes = spill_bytes
        self._file: BinaryIO | None = None
        self._tmp_path = tmp_path
        self._final_path = final_path
        self._committer = committer
        self._spares = spares  # files of delivered messages to write a small one into
        self._notify = notify  # told about each message once it is durable (delivery)
        self._phase = _Phase.OPEN
        self._error: OSError | None = None

    def write(self, data: bytes) -> None:
        """Append body bytes. After a failed write or an abort, further data is dropped
        (the session may keep reading until the end of DATA); commit() reports it."""
        if self._phase is not _Phase.OPEN:
            if self._phase is _Phase.DISCARDED:
                return
            raise RuntimeError(f"write after commit of {self.id}")
        try:
            if self._file is not None:
                self._file.write(data)
            else:
                self._chunks.append(data)
                self._held += len(data)
                if self._held > self._spill_bytes:
                    self._spill()
        except OSError as err:
            self._error = err
            log.warn("cannot write {queue_id}: {error}", queue_id=self.id, error=err)
            self._discard()
            return
        self.size += len(data)

    def _spill(self) -> None:
        self._file = create_exclusive(self._tmp_path)
        chunks, self._chunks = self._chunks, []
        self._file.write(b"".join(chunks))

    def rewrite(self, change: Callable[[BinaryIO, Callable[[bytes], None]], None]) -> None:
        """Replace the body written so far by what ``change(old, write)`` writes, reading
        the old body from the binary file ``old``. Blocking (a large message is read from
        and written to tmp/): call it in a thread, with no other call meanwhile. If
        ``change`` raises, the message is discarded, as by abort(), and the error passes."""
        if self._phase is not _Phase.OPEN:
            raise RuntimeError(f"rewrite of {self.id} after commit or abort")
        if self._file is None:
            old: BinaryIO = io.BytesIO(b"".join(self._chunks[1:]))
        else:
            self._file.flush()
            old = open(self._tmp_path, "rb")  # noqa: SIM115 - closed below
            old.seek(len(self._head))
            unlink_quietly(self._tmp_path)  # still readable; the new body may need the name
            close_quietly(self._file)
            self._file = None
        self._chunks, self._held, self.size = [self._head], len(self._head), 0
        try:
            with old:
                change(old, self.write)
        except BaseException:
            self._discard()
            raise

    def commit(self) -> Deferred:
        """Fires with the queue id once the message is durable in queue/ (or hold/);
        errbacks with errors.StorageError (``full`` when the disk is full), leaving
        nothing behind."""
        if self._phase is _Phase.DISCARDED:
            if self._error is None:
                raise RuntimeError(f"commit after abort of {self.id}")
            return fail(StorageError.of(self._error))
        if self._phase is not _Phase.OPEN:
            raise RuntimeError(f"second commit of {self.id}")
        self._phase = _Phase.COMMITTING
        d = self._committer.submit(self._make_durable,
                                   undo=lambda: unlink_quietly(self._final_path))
        d.addCallbacks(self._committed, self._failed)
        return d

    def abort(self) -> None:
        """Discard the message. Harmless when repeated, after a failure, or once commit()
        was called (the commit's own outcome then stands)."""
        if self._phase is _Phase.OPEN:
            self._discard()
            log.debug("aborted {queue_id}", queue_id=self.id)

    def _discard(self) -> None:
        self._phase = _Phase.DISCARDED
        self._chunks = []
        if self._file is not None:
            unlink_quietly(self._tmp_path)
            close_quietly(self._file)

    def _make_durable(self) -> tuple[str]:
        """In a group commit thread: the file's data, then its name in the target dir."""
        if self._file is None:
            self._write_new(b"".join(self._chunks))
            self._chunks = []
        else:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            except BaseException:
                close_quietly(self._file)
                unlink_quietly(self._tmp_path)
                raise
        try:
            os.rename(self._tmp_path, self._final_path)
        except BaseException:
            unlink_quietly(self._tmp_path)
            raise
        return (os.path.dirname(self._final_path),)

    def _write_new(self, data: bytes) -> None:
        """Write the file with all its data, unbuffered: one write call, one fsync. The
        file is a spare when there is one (spares.py), else a new one."""
        fd = self._spares.take(self._tmp_path)
        spare = fd is not None
        if fd is None:
            fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         FILE_MODE)  # a name already taken is not ours to remove
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if spare:
                    os.ftruncate(fd, len(data))  # the spare's old content may be longer
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            unlink_quietly(self._tmp_path)
            raise

    def _committed(self, _: None) -> str:
        # Not logged here: whoever made the message logs it with more to say (the
        # session's "accepted", delivery's DSN line), once.
        self._phase = _Phase.COMMITTED
        if self._notify is not None:
            self._notify(self.envelope)
        return self.id

    def _failed(self, failure: Failure) -> Failure:
        self._phase = _Phase.DISCARDED
        if failure.check(OSError):  # disk full, I/O error: the admin needs the reason only
            log.error("cannot commit {queue_id}: {error}", queue_id=self.id,
                      error=failure.value)
        else:
            log.failure("cannot commit {queue_id}", failure, LogLevel.error, queue_id=self.id)
        return Failure(StorageError.of(failure.value))
