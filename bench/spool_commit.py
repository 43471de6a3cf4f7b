"""Commits per second into the spool: group commit against one fsync per message.

Both runs use the same Spool code on the same filesystem: ``concurrency`` senders each
create a message, write it in SMTP-sized lines, commit, and start the next, until ``n``
messages are queued. The baseline swaps the group commit for one that syncs every message
on its own (file fsync, rename, directory fsync) in the same number of threads.

    python bench/spool_commit.py [-n 2000] [--size 5120] [--concurrency 50] [--dir DIR]
                                 [--threads 4] [--fsync-delay-ms MS]

A virtual disk with a write-back cache makes fsync nearly free, which hides what batching
saves; --fsync-delay-ms adds a sleep to every fsync (data and directory) to model a disk
whose cache flush is slow, e.g. 2 for a consumer SSD, 8 for a spinning disk. The model is
pessimistic for parallel fsyncs: a real journal merges concurrent ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailrelay.files import fsync_dir  # noqa: E402
from mailrelay.model import Envelope  # noqa: E402
from mailrelay.spool.spool import Spool  # noqa: E402


class PerMessageSync:
    """The baseline: each job alone in a pool thread, with its own directory fsyncs."""

    def __init__(self, reactor, pool) -> None:
        self._reactor = reactor
        self._pool = pool
        self.batches = 0
        self.dir_syncs = 0

    def submit(self, apply, undo=None) -> defer.Deferred:
        def run() -> int:
            dirs = list(apply())
            for path in dirs:
                fsync_dir(path)
            return len(dirs)

        def done(synced: int) -> None:
            self.batches += 1
            self.dir_syncs += synced

        return deferToThreadPool(self._reactor, self._pool, run).addCallback(done)

    def drain(self) -> defer.Deferred:
        return defer.succeed(None)


def body(size: int) -> list[bytes]:
    line = b"x" * 76 + b"\r\n"
    return [line] * (size // len(line))


async def run(reactor, directory: str, args, grouped: bool) -> dict:
    n = args.n
    spool = Spool(directory, reactor, min_free_bytes=0, threads=args.threads)
    if not grouped:
        spool._sync = PerMessageSync(reactor, spool._pool)  # same threads, no batching
    spool.open()
    lines = body(args.size)
    latencies: list[float] = []
    todo = iter(range(n))

    async def sender() -> None:
        for _ in todo:
            msg = spool.create(Envelope(id="", sender="a@x.example", recipients=["b@y.example"],
                                        user="x.example", account="default",
                                        client_ip="127.0.0.1", helo="bench", tls=True,
                                        received_at=time.time()))
            for line in lines:
                msg.write(line)
            started = time.perf_counter()
            await msg.commit()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(sender()) for _ in range(args.concurrency)])
    elapsed = time.perf_counter() - started
    await spool.close()
    assert len(spool.queued()) == n
    latencies.sort()
    return {"commits/s": n / elapsed, "dir fsyncs": spool.dir_syncs,
            "per batch": n / spool.batches,
            "p50 ms": 1000 * latencies[len(latencies) // 2],
            "p99 ms": 1000 * latencies[int(len(latencies) * 0.99)]}


def slow_fsync(delay: float):
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        time.sleep(delay)  # blocks the calling thread only, like a slow cache flush

    return fsync


async def main(reactor, args) -> None:
    if args.fsync_delay_ms:
        os.fsync = slow_fsync(args.fsync_delay_ms / 1000)
    base = tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir)
    try:
        results = {}
        for name, grouped in (("group commit", True), ("fsync per message", False)):
            results[name] = await run(reactor, os.path.join(base, name.replace(" ", "-")),
                                      args, grouped)
    finally:
        shutil.rmtree(base)
    print(f"{args.n} messages of {args.size} bytes, {args.concurrency} concurrent senders, "
          f"{args.threads} spool threads, spool on {args.dir or tempfile.gettempdir()}, "
          f"fsync + {args.fsync_delay_ms} ms")
    columns = list(next(iter(results.values())))
    print(f"{'':20}" + "".join(f"{c:>12}" for c in columns))
    for name, row in results.items():
        print(f"{name:20}" + "".join(f"{row[c]:>12.1f}" for c in columns))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="messages per run (2000)")
    parser.add_argument("--size", type=int, default=5 * 1024, help="body bytes (5120)")
    parser.add_argument("--concurrency", type=int, default=50, help="senders at once (50)")
    parser.add_argument("--dir", help="where to make the spool (default: the temp dir)")
    parser.add_argument("--threads", type=int, default=4, help="spool threads (4)")
    parser.add_argument("--fsync-delay-ms", type=float, default=0,
                        help="extra time per fsync, to model a slow disk (0)")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
