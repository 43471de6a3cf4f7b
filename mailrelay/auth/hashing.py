"""A thread pool of its own for password hashing.

An argon2id verification holds 19 MiB for about 25 ms of one core (auth.passwords). Run in
the reactor's shared pool of ten threads, a burst of logins verified ten at a time: 190 MiB
at once, which glibc then keeps in the threads' malloc arenas for the life of the process,
for no gain in speed on a machine with fewer cores. Here at most one verification per CPU
runs at a time and the rest wait their turn, so hashing can hold at most CPUs x 19 MiB, and
the reactor's pool stays free for the work that waits on I/O.

glibc would still keep the last 19 MiB block of each hashing thread in that thread's malloc
arena (its mmap threshold rises to the size of the largest block freed), about CPUs x 19
MiB held for good after a burst of logins. The pool fixes the threshold at 1 MiB when it
starts, so each block is mapped on its own and given back when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mailrelay import tuning

T = TypeVar("T")


def _daemon_thread(*args, **kwargs) -> threading.Thread:
    # Hashing has no side effect to finish: a process that exits without stopping the
    # pool (a test run, an admin command) must not wait for its threads.
    return threading.Thread(*args, daemon=True, **kwargs)


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter
MMAP_THRESHOLD = 1 << 20


def _fix_mmap_threshold() -> bool:
    """Blocks over 1 MiB mapped on their own (glibc only; elsewhere nothing to do)."""
    if not tuning.on("mmap_threshold"):  # MAILRELAY_STOCK: glibc's own threshold
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


class HashingPool:
    """Runs CPU-bound password work in at most ``threads`` threads (default: one per CPU).

    The threads start with the first job and stop when the reactor shuts down.
    """

    def __init__(self, reactor, threads: int | None = None) -> None:
        self.threads = threads if threads is not None else _cpus()
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="password-hashing")
        self._pool.threadFactory = _daemon_thread
        self._shutdown_id = None

    def run(self, f: Callable[..., T], *args) -> Deferred[T]:
        """``f(*args)`` in a hashing thread; the Deferred fires on the reactor thread."""
        if not self._pool.started:
            _fix_mmap_threshold()
            self._pool.start()
            self._shutdown_id = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._shutdown)
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def stop(self) -> None:
        """Stop the threads now (a job already running finishes first)."""
        if self._shutdown_id is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_id)
            self._shutdown()

    def _shutdown(self) -> None:
        self._shutdown_id = None
        self._pool.stop()
