"""The cost of the shared stores: one mailrelay node on local files (SQLite suppressions
and statistics, counters in process) against the same node sharing everything a cluster
shares: its limits in a private redis-server (bench/cluster.py) and its suppressions,
statistics and return-path records in a private PostgreSQL (tests/pg_server.py: initdb in
a temporary directory, loopback, started and stopped by its PID), in the same run,
alternating. A third variant, PostgreSQL with the counters in process, shows PostgreSQL's
share alone.

Rows per variant: accept (plain SMTP with IP authentication, c=20, 10 messages a
connection, delivery off) and end to end (c=20, one message a connection, to the sink).
PostgreSQL's cost per message: its transactions (``pg_stat_database.xact_commit``), rows
written, and its processes' CPU, over the end-to-end run (which accepts and delivers).
"""

from __future__ import annotations

import os
import sys
import time

from bench import cluster, procs
from bench.figures import Measure, Value, median

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import pg_server  # noqa: E402 - the tests' private PostgreSQL, reused

VARIANTS = ("files", "postgres", "redis+postgres")
FIGURES = ("accept", "e2e")


def available() -> bool:
    return pg_server.installed() and cluster.available()


class PostgresProcess:
    """The tests' private server and one database for the bench."""

    def __init__(self) -> None:
        self.server = pg_server.PostgresServer()
        self.dsn = ""

    def start(self) -> None:
        self.server.start()
        self.dsn = self.server.create_database("bench")

    def cpu(self) -> float:
        process = self.server.process
        return procs.tree_cpu(process.pid) if process else 0.0

    def counters(self) -> tuple[int, int]:
        """Transactions committed and rows written in the bench's database so far."""
        import psycopg

        time.sleep(1.2)  # the server publishes its statistics about once a second
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            xacts, rows = conn.execute(
                "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM "
                "pg_stat_database WHERE datname = current_database()").fetchone()
        return int(xacts), int(rows)

    def stop(self) -> None:
        self.server.stop()


def sections(variant: str, redis: str, postgres: str) -> dict[str, dict[str, str]]:
    """The counting of cluster.limits_on (in process, or in Redis) and the stores."""
    out = cluster.limits_on(redis if variant == "redis+postgres" else None)
    if variant != "files":
        out.setdefault("cluster", {}).update(postgres=postgres, node_id="bench")
    return out


def run_round(server, redis, pg: PostgresProcess, sink, sizes, base, say) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for variant in VARIANTS:
        server.extra_sections = sections(variant, redis.socket, pg.dsn)
        for figure, delivery in (("accept", False), ("e2e", True)):
            key = f"pg.{variant}.{figure}"
            server.configure(delivery=delivery)
            if variant != "files":  # the users come from the database (once, then kept)
                server.admin("cluster", "import-users")
            try:
                server.start()
                server.delivers = delivery
                m = Measure(server, sink, sizes, base, say)
                if figure == "accept":
                    out[key] = m.accept("plain", 20, 10)
                    continue
                cpu, (xacts, rows) = pg.cpu(), pg.counters()
                out[key] = m.end_to_end()["e2e.rate"]
                ok = sink.count()
                if variant != "files" and ok:
                    pg_cpu = pg.cpu() - cpu
                    xacts2, rows2 = pg.counters()
                    out[f"pg.{variant}.cost"] = Value(
                        1e6 * pg_cpu / ok, "", {"xacts": (xacts2 - xacts) / ok,
                                                "rows": (rows2 - rows) / ok})
            except Exception as e:
                say(f"{key}: {type(e).__name__}: {e}")
                out[key] = Value(None, f"n/a ({type(e).__name__}: {str(e)[:80]})")
            finally:
                server.stop()
    server.extra_sections = {}
    return out


def report(rounds: list[dict[str, Value]]) -> str:
    keys = sorted({k for r in rounds for k in r})
    merged = {k: median([r[k] for r in rounds if k in r]) for k in keys}
    lines = [f"shared stores (medians of {len(rounds)} round(s); accept: plain, c=20, "
             "10 msg/conn, delivery off; end to end: c=20, 1 msg/conn):"]
    for figure in FIGURES:
        base = merged.get(f"pg.files.{figure}")
        for variant in VARIANTS:
            got = merged.get(f"pg.{variant}.{figure}")
            if got is None or got.value is None:
                lines.append(f"  {figure:6} {variant:15} n/a {got.note if got else ''}")
                continue
            line = f"  {figure:6} {variant:15} {got.value:8,.0f}/s"
            if variant != "files" and base and base.value:
                ratio = got.value / base.value
                line += (f"  {ratio:.2f}x files "
                         f"({'within' if ratio >= 0.9 else 'NOT within'} 10%)")
            cpu = got.details.get("server_cpu_ms")
            if cpu is not None:
                line += f"  node CPU {1e3 * cpu:.0f} us/msg"
            lines.append(line)
        lines.append("    every round: " + "; ".join(
            ", ".join(f"{(r[f'pg.{v}.{figure}'].value or 0):,.0f}" for v in VARIANTS
                      if f"pg.{v}.{figure}" in r) for r in rounds))
    for variant in VARIANTS[1:]:
        if (cost := merged.get(f"pg.{variant}.cost")) and cost.value is not None:
            lines.append(f"  PostgreSQL per message ({variant}, end to end): "
                         f"{cost.value:.0f} us CPU, {cost.details['xacts']:.3f} "
                         f"transactions, {cost.details['rows']:.2f} rows written")
    return "\n".join(lines)
