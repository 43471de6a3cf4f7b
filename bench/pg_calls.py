#!/usr/bin/env python3
"""What each PostgreSQL write of the shared stores costs (mailrelay/postgres/), against a
private server (tests/pg_server.py): CPU of this process (the node's thread that makes
the call) and of the server's processes, per call, one call at a time. The rows: a
statistics batch as a node writes it every second (its id and N counter rows), the same
batch written again (skipped by its id), a return-path record (one per message of an
account with a bounce domain), a suppression added (with its NOTIFY), and a suppression
query by address (what delivery would make per message without the cache in memory).

    python3 bench/pg_calls.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.pgstore import PostgresProcess  # noqa: E402
from mailrelay.model import Envelope  # noqa: E402
from mailrelay.postgres.db import Database  # noqa: E402
from mailrelay.postgres.returnpaths import PgReturnPathStore  # noqa: E402
from mailrelay.postgres.stats import PgStatsStore  # noqa: E402
from mailrelay.postgres.suppressions import PgSuppressionStore  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def envelope(i: int) -> Envelope:
    return Envelope(id=f"{i:018x}node", sender="news@doe.test", recipients=["a@x.test"],
                    user="news@doe.test", account="default", client_ip=None, helo=None,
                    tls=True, received_at=0.0, return_path="bounces.doe.test")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    n = p.parse_args().calls
    pg = PostgresProcess()
    pg.start()
    db = Database(pg.dsn)
    db.open()
    try:
        stats, paths = PgStatsStore(db), PgReturnPathStore(db)
        suppressions = PgSuppressionStore(db)
        for i in range(10000):
            suppressions.add(f"r{i}@x.test", "default", "news@doe.test")
        hour = int(time.time() // 3600)

        def batch(rows: int):
            return {("default", f"u{k}", hour, "delivered"): 1 for k in range(rows)}

        one, twenty = batch(1), batch(20)
        rows = [
            ("stats batch, 1 counter row", lambda i: stats.add(one, [], "n", f"a{i}")),
            ("stats batch, 20 counter rows", lambda i: stats.add(twenty, [], "n", f"b{i}")),
            ("stats batch again (skipped)", lambda i: stats.add(twenty, [], "n", "b0")),
            ("return-path record", lambda i: paths.record(envelope(i))),
            ("suppression added (NOTIFY)", lambda i: suppressions.add(
                f"new{i}@x.test", "default", "news@doe.test")),
            ("suppression query, 1 address", lambda i: suppressions.suppressed(
                "default", "news@doe.test", [f"r{i}@x.test"])),
        ]
        print(f"{n} calls each, one at a time; CPU per call in microseconds")
        print(f"{'':32} {'this process':>13} {'PostgreSQL':>11} {'wall':>8}")
        for name, call in rows:
            time.sleep(0.5)
            mine, theirs, wall = cpu(), pg.cpu(), time.monotonic()
            for i in range(n):
                call(i)
            wall = time.monotonic() - wall
            mine, theirs = cpu() - mine, pg.cpu() - theirs
            print(f"{name:32} {1e6 * mine / n:13.0f} {1e6 * theirs / n:11.0f} "
                  f"{1e6 * wall / n:8.0f}")
        print(f"machine: {os.cpu_count()} cores, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        db.close()
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
