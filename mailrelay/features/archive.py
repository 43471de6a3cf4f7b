"""The archive: a copy of every accepted message of a user, one Maildir per user.

``<root>/<user>/{tmp,new,cur}``; a copy is written to ``tmp/`` and renamed into ``new/``,
so a reader never sees half a message. File names start with the archive time
(``<unix time>.<queue id>_<random>.<host>``), which is what ``prune`` goes by. The copy is
the message as accepted (CRLF lines), preceded by ``Return-Path`` and one
``X-Envelope-To`` per envelope recipient, since Bcc recipients appear nowhere else.
The archive is a copy, not the durable original (that is the spool): no fsync.
Archive's methods block: the daemon calls them from a thread pool (ArchivePruner).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default
from email.utils import parseaddr
from urllib.parse import quote, unquote

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from mailrelay.files import unlink_quietly

log = Logger()

MAX_HEADER = 256 * 1024  # bytes read to list an entry
DAY = 86400


@dataclass(frozen=True)
class Entry:
    id: str  # the file name in the user's Maildir
    date: float  # when it was archived (unix time)
    sender: str  # the From: address
    subject: str
    size: int  # bytes on disk


class Archive:
    """``retention_days`` of 0 keeps everything."""

    def __init__(self, root: str, retention_days: float = 90.0) -> None:
        self.root = root
        self.retention_days = retention_days
        self._host = socket.gethostname().replace("/", "_").replace(":", "_").replace(".", "_")

    def store(
        self,
        user: str,
        queue_id: str,
        data: bytes,
        sender: str,
        recipients: list[str],
        when: float | None = None,
    ) -> str:
        """Archive one message; returns its id."""
        when = time.time() if when is None else when
        maildir = self._maildir(user, create=True)
        name = f"{int(when)}.{queue_id}_{secrets.token_hex(4)}.{self._host}"
        envelope = [f"Return-Path: <{sender}>\r\n".encode()]
        envelope += [f"X-Envelope-To: <{r}>\r\n".encode() for r in recipients]
        tmp = os.path.join(maildir, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines(envelope)
                f.write(data)
            os.rename(tmp, os.path.join(maildir, "new", name))
        except BaseException:
            unlink_quietly(tmp)
            raise
        return name

    def list(self, user: str) -> list[Entry]:
        """The user's archived messages, oldest first (empty for an unknown user)."""
        entries = [_entry(path, name) for path, name in _messages(self._maildir(user))]
        return sorted((e for e in entries if e is not None), key=lambda e: (e.date, e.id))

    def users(self) -> list[str]:
        try:
            return sorted(unquote(n) for n in os.listdir(self.root) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def prune(self, now: float | None = None) -> int:
        """Remove copies older than the retention; returns how many."""
        if not self.retention_days:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * DAY
        removed = 0
        for user in self.users():
            for path, name in _messages(self._maildir(user)):
                if _archived_at(path, name) < cutoff and unlink_quietly(path):
                    removed += 1
        return removed

    def retire(self, user: str, label: str) -> bool:
        """Move ``user``'s Maildir to ``label`` (a name no user can have: when the user is
        deleted or its name given to a new user): a new user of that name starts with an
        empty archive, and the old copies stay until the retention removes them. True if
        there was one."""
        try:
            os.rename(self._maildir(user), self._maildir(label))
        except FileNotFoundError:
            return False
        return True

    def _maildir(self, user: str, create: bool = False) -> str:
        if not user:
            raise ValueError("empty user name")
        name = quote(user, safe="@+")  # "/" encoded; a leading "." too: no "..", no hidden
        if name.startswith("."):
            name = "%2E" + name[1:]
        path = os.path.join(self.root, name)
        if create:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(path, sub), mode=0o750, exist_ok=True)
        return path


def _messages(maildir: str) -> Iterator[tuple[str, str]]:
    """``(path, name)`` of each message in a Maildir (delivered: ``new/`` and ``cur/``)."""
    for sub in ("new", "cur"):
        directory = os.path.join(maildir, sub)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            yield os.path.join(directory, name), name


def _archived_at(path: str, name: str) -> float:
    head = name.split(".", 1)[0]
    if head.isdigit():
        return float(head)
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return float("inf")


def _entry(path: str, name: str) -> Entry | None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(MAX_HEADER)
    except FileNotFoundError:  # pruned or moved meanwhile
        return None
    headers = BytesHeaderParser(policy=default).parsebytes(head.split(b"\r\n\r\n", 1)[0])
    return Entry(
        id=name,
        date=_archived_at(path, name),
        sender=parseaddr(str(headers.get("From", "")))[1],
        subject=str(headers.get("Subject", "")),
        size=size,
    )


class ArchivePruner(Service):
    """Prunes ``archive`` at start and then every ``interval`` seconds, in a pool thread."""

    def __init__(self, archive: Archive, reactor, interval: float = DAY, threadpool=None) -> None:
        self.archive = archive
        self._reactor = reactor
        self._threadpool = threadpool
        self._loop = task.LoopingCall(self.prune)
        self._loop.clock = reactor
        self.interval = interval

    def prune(self) -> defer.Deferred:
        pool = self._threadpool or self._reactor.getThreadPool()
        d = threads.deferToThreadPool(self._reactor, pool, self.archive.prune,
                                      self._reactor.seconds())

        def done(removed: int) -> None:
            log.info("archive: {removed} copies older than {days:g} days removed",
                     removed=removed, days=self.archive.retention_days)

        # A failure is logged; the next day's run tries again.
        return d.addCallbacks(done, lambda f: log.failure("archive pruning failed", f))

    def startService(self) -> None:
        super().startService()
        if self.archive.retention_days:
            self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
