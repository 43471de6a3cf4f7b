#!/usr/bin/env python3
"""CPU of this process per shared-counter call (mailrelay/cluster/), against a private
redis-server on a unix socket: one call waited for at a time, and 20 at once (as 20
sessions do). The rows: a bare PING (the client's floor), the rate script alone, a
transaction (MAIL), a transaction and its commit (a message), a connection's leases
(open, login, close).

    python3 bench/redis_calls.py [--calls 3000] [--tls]

With ``--tls`` the same calls go over TLS to a loopback port (``rediss://``, the
certificate verified) instead of the unix socket.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor  # noqa: E402

from bench.certs import make_certificate  # noqa: E402
from bench.cluster import RedisProcess  # noqa: E402
from mailrelay.cluster import scripts  # noqa: E402
from mailrelay.cluster.connection import connect  # noqa: E402
from mailrelay.cluster.redis_counters import (  # noqa: E402
    RedisConnectionLimits,
    RedisCounters,
    RedisRateLimiter,
)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@defer.inlineCallbacks
def measure(url: str, calls: int, ca_file: str = ""):
    pool = connect(url, reactor, ca_file=ca_file)
    counters = RedisCounters(pool, reactor, prefix="bench:")
    rates = RedisRateLimiter(counters, per_hour=10**9)
    limits = RedisConnectionLimits(counters, max_per_ip=10**6, max_per_user=10**6)
    yield rates.transaction("warm")

    def message(i):
        return rates.transaction(f"u{i % 20}").addCallback(
            lambda r: defer.maybeDeferred(r.commit))

    @defer.inlineCallbacks
    def connection(i):
        ticket = yield limits.open(f"192.0.2.{i % 200}")
        yield limits.bind_user(ticket, f"u{i % 20}")
        ticket.close()

    rows = [("PING", lambda i: pool.call("PING")),
            ("rate script", lambda i: counters.run(
                scripts.RATE_RESERVE, ["bench:a", "bench:b"], [60, 1, 0, 0])),
            ("transaction (MAIL)", lambda i: rates.transaction(f"u{i % 20}")),
            ("transaction + commit", message),
            ("connection: open, login, close", connection)]
    for label, call in rows:
        figures = []
        for batch in (1, 20):
            before = cpu()
            for i in range(0, calls, batch):
                yield defer.gatherResults([call(i + j) for j in range(batch)])
            figures.append(f"{1e6 * (cpu() - before) / calls:4.0f} us")
        print(f"{label:32} one at a time {figures[0]}, 20 at once {figures[1]}")
    yield pool.disconnect()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--tls", action="store_true", help="over TLS on a loopback port")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailrelay-redis-") as base:
        tls, port, ca_file = None, 0, ""
        if args.tls:
            tls = make_certificate(base)
            ca_file = tls[0]  # self-signed: its own root
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        redis = RedisProcess(os.path.join(base, "redis"), tls, port)
        redis.start()
        url = f"rediss://127.0.0.1:{port}" if tls else f"unix:{redis.socket}"
        try:
            failed = []
            d = measure(url, args.calls, ca_file)
            d.addErrback(failed.append).addBoth(lambda _: reactor.stop())
            reactor.run()
            if failed:
                failed[0].printTraceback()
                return 1
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
