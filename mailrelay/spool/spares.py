"""Spare files: the files of delivered messages, kept for new messages to be written into.

Every message gets a file when it is received and loses it once delivered. Making a file
allocates an inode and removing one frees it; ext4 without a journal also skips, at every
allocation, each free inode of the group that was freed in the last 12 hours (its
``recently_deleted`` check), so a busy spool pays more for every new file the longer it
runs. Instead, removal renames a small delivered message's file into one of ``slots``
numbered names in ``spare/``, and the next small message is written over a spare it claims
by renaming it to its own ``tmp/`` name: no inode made or freed, the blocks overwritten in
place. The new content is written, truncated to its length and fsynced before the file is
renamed into ``queue/``, exactly as a new file's.

- A spare is claimed by a rename to the new message's own name: whoever renames it has it,
  so two writers never share a file, whichever process they are in.
- Removal renames over a numbered slot, so ``spare/`` never holds more than ``slots``
  files of at most ``max_bytes`` each (the spare a slot held is removed by the rename).
- The relay empties ``spare/`` when it opens the spool: after a crash on a filesystem
  without a journal a name in ``spare/`` might also name a queued message.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable

from mailrelay.files import unlink_quietly

SLOTS = 256  # at most this many spare files
LIST_INTERVAL = 0.02  # seconds between two readings of spare/ when none is left in hand


class Spares:
    """The spares in ``directory``; ``keep`` and ``take`` are blocking, for threads.
    ``max_bytes``: a larger file is removed, not kept (the spool's in-memory limit: a
    larger message is written as it arrives, into a new file)."""

    def __init__(self, directory: str, max_bytes: int, slots: int = SLOTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.slots = slots
        self.max_bytes = max_bytes
        self._clock = clock
        self._next_slot = itertools.count()
        self._lock = threading.Lock()
        self._names: list[str] = []  # read from spare/, not yet tried
        self._listed = float("-inf")

    def clear(self) -> None:
        """Remove every spare (the relay, when it opens the spool)."""
        for name in os.listdir(self.directory):
            unlink_quietly(os.path.join(self.directory, name))

    def keep(self, path: str) -> bool:
        """Rename the file at ``path`` into a slot if it is small enough; False when it is
        not kept (too large, gone, or it cannot be renamed): the caller removes it."""
        try:
            if os.stat(path).st_size > self.max_bytes:
                return False
            name = str(next(self._next_slot) % self.slots)
            os.rename(path, os.path.join(self.directory, name))
        except OSError:
            return False
        with self._lock:
            if len(self._names) < self.slots:  # this process can use it without a listing
                self._names.append(name)
        return True

    def take(self, path: str) -> int | None:
        """Claim a spare as ``path`` and open it for writing (the caller writes, truncates
        and fsyncs); None when there is none to take."""
        while True:
            with self._lock:
                if not self._names:
                    now = self._clock()
                    if now - self._listed < LIST_INTERVAL:
                        return None
                    self._listed = now
                    try:
                        self._names = os.listdir(self.directory)
                    except OSError:  # spare/ removed by hand: new files until it is back
                        return None
                    if not self._names:
                        return None
                name = self._names.pop()
            try:
                os.rename(os.path.join(self.directory, name), path)
            except FileNotFoundError:
                continue  # claimed or replaced since it was listed
            except OSError:
                return None  # a new file, made the usual way, meets whatever this is
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:  # not a file this process may write: make a new one
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return None
            return fd
