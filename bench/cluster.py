"""The cost of shared counters: one mailrelay node counting its limits in a private
redis-server (``[cluster] redis``) against the same node counting them in process, in the
same run, in turn (local, Redis; then Redis, local; ...).

Both count: rate limits per user (a limit far above the load, so nothing is refused) and
connections per address and per user, so every message makes its script calls (MAIL
reserves, the commit moves the unit; each connection takes and drops its leases). The
load is the accept row that exposes per-message costs most: plain SMTP with IP
authentication, c=20, 10 messages a connection, delivery off (nothing but accepting).
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import time

from bench import procs
from bench.figures import Measure, Value, median

REDIS_SERVER = "/usr/bin/redis-server"
ROWS = ("cluster.local", "cluster.redis", "cluster.cpu", "cluster.redis_cpu",
        "cluster.calls", "cluster.redis_usec")


def available() -> bool:
    return bool(shutil.which("redis-server") or os.path.exists(REDIS_SERVER))


class RedisProcess:
    """A private redis-server on a unix socket in ``directory``, nothing saved, stopped by
    its PID."""

    def __init__(self, directory: str, tls: tuple[str, str] | None = None,
                 tls_port: int = 0) -> None:
        """``tls``: a certificate and key for a loopback ``tls_port`` as well."""
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.socket = os.path.join(directory, "redis.sock")
        self.tls, self.tls_port = tls, tls_port
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> None:
        conf = os.path.join(self.dir, "redis.conf")
        with open(conf, "w") as f:
            f.write(f"port 0\nunixsocket {self.socket}\nunixsocketperm 700\nsave \"\"\n"
                    f"appendonly no\ndir {self.dir}\nlogfile {self.dir}/redis.log\n")
            if self.tls:
                f.write(f"bind 127.0.0.1\ntls-port {self.tls_port}\n"
                        f"tls-cert-file {self.tls[0]}\ntls-key-file {self.tls[1]}\n"
                        f"tls-ca-cert-file {self.tls[0]}\ntls-auth-clients no\n")
        self.proc = subprocess.Popen([shutil.which("redis-server") or REDIS_SERVER, conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=procs.die_with_this_process())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            ping = subprocess.run(["redis-cli", "-s", self.socket, "PING"],
                                  capture_output=True, text=True, timeout=10)
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer")

    def cpu(self) -> float:
        return procs.tree_cpu(self.proc.pid) if self.proc else 0.0

    def command(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-s", self.socket, *args], capture_output=True,
                              text=True, timeout=10).stdout

    def commandstats(self) -> dict[str, tuple[int, int]]:
        """``INFO commandstats``: command -> (calls, microseconds inside Redis)."""
        stats = {}
        for line in self.command("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line.partition(":")
                values = dict(f.split("=") for f in fields.split(","))
                stats[name[8:]] = (int(values["calls"]), int(values["usec"]))
        return stats

    def stop(self) -> None:
        if self.proc is not None:
            procs.terminate(self.proc, 10)
        self.proc = None


def limits_on(shared: str | None) -> dict[str, dict[str, str]]:
    """The sections that turn counting on (limits the load never reaches), and Redis."""
    sections = {"limits": {"max_connections": "0", "max_connections_per_ip": "100000",
                           "max_connections_per_user": "100000",
                           "rate_per_hour": "1000000000", "rate_per_minute": "1000000000"}}
    if shared:
        sections["cluster"] = {"redis": f"unix:{shared}", "node_id": "bench"}
    return sections


_rounds = itertools.count()


def run_round(server, redis: RedisProcess, sink, sizes, base, say) -> dict[str, Value]:
    """One round: the node on local counters and on Redis, in turn (local first in odd
    rounds, Redis first in even ones, so neither is always the one run while the other
    work on the machine changes); their accept rates, the node's CPU per message with
    each, and redis-server's CPU per message."""
    out: dict[str, Value] = {}
    both = [("cluster.local", None), ("cluster.redis", redis.socket)]
    for name, shared in both if next(_rounds) % 2 == 0 else both[::-1]:
        server.extra_sections = limits_on(shared)
        server.configure(delivery=False)
        try:
            server.start()
            server.delivers = False
            before = redis.cpu()
            redis.command("CONFIG", "RESETSTAT")
            out[name] = Measure(server, sink, sizes, base, say).accept("plain", 20, 10)
            ok = out[name].details.get("ok") or 0
            if shared and ok:
                out["cluster.redis_cpu"] = Value(1e3 * (redis.cpu() - before) / ok)
                # The node's calls per message (EVALSHA, EVAL: a script's own commands
                # are counted too, inside it) and the scripts' time inside Redis, each
                # command's share of it in the details.
                stats = {k: v for k, v in redis.commandstats().items()
                         if k not in ("info", "config|resetstat")}
                calls = {k: c / ok for k, (c, _) in stats.items()}
                out["cluster.calls"] = Value(sum(c for k, c in calls.items()
                                                 if k in ("eval", "evalsha")), "", calls)
                out["cluster.redis_usec"] = Value(
                    sum(u for k, (_, u) in stats.items() if k in ("eval", "evalsha")) / ok,
                    "", {k: u / ok for k, (_, u) in stats.items()})
        except Exception as e:
            say(f"{name}: {type(e).__name__}: {e}")
            out[name] = Value(None, f"n/a ({type(e).__name__}: {str(e)[:80]})")
        finally:
            server.stop()
    server.extra_sections = {}
    cpu = [out[k].details.get("server_cpu_ms") for k in ("cluster.local", "cluster.redis")]
    if None not in cpu:
        out["cluster.cpu"] = Value(cpu[1] - cpu[0], "", {"local": cpu[0], "redis": cpu[1]})
    return out


def report(rounds: list[dict[str, Value]]) -> str:
    merged = {k: median([r[k] for r in rounds if k in r]) for k in ROWS
              if any(k in r for r in rounds)}
    local, shared = merged.get("cluster.local"), merged.get("cluster.redis")
    if not local or not shared or local.value is None or shared.value is None:
        return "shared counters: n/a " + str([(k, v.note) for k, v in merged.items()])
    ratio = shared.value / local.value
    own = [r["cluster.redis"].value / r["cluster.local"].value for r in rounds
           if r.get("cluster.local") and r.get("cluster.redis") and r["cluster.local"].value
           and r["cluster.redis"].value is not None]
    lines = [
        "shared counters (accept, plain, c=20, 10 msg/conn, delivery off; medians of "
        f"{len(rounds)} round(s)):",
        f"  local counters {local.value:,.0f}/s, Redis {shared.value:,.0f}/s: "
        f"{ratio:.2f}x ({'within' if ratio >= 0.9 else 'NOT within'} 10%)",
        f"  median of the rounds' own ratios (each round runs both in turn): "
        f"{statistics.median(own) if own else 0:.2f}x",
        "  every round, local -> Redis: " + ", ".join(
            f"{r['cluster.local'].value or 0:,.0f} -> {r['cluster.redis'].value or 0:,.0f}"
            for r in rounds if "cluster.local" in r and "cluster.redis" in r),
    ]
    if (cpu := merged.get("cluster.cpu")) and cpu.value is not None:
        lines.append(f"  node CPU per message: +{1e3 * cpu.value:.0f} us with Redis "
                     f"({cpu.details['local']:.3f} -> {cpu.details['redis']:.3f} ms)")
    if (rc := merged.get("cluster.redis_cpu")) and rc.value is not None:
        lines.append(f"  redis-server CPU per message: {1e3 * rc.value:.0f} us")
    if (calls := merged.get("cluster.calls")) and calls.value is not None:
        lines.append(f"  script calls per message: {calls.value:.2f}; Redis commands in them: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in sorted(calls.details.items())
                                 if isinstance(v, float) and v >= 0.005
                                 and k not in ("eval", "evalsha")))
    if (usec := merged.get("cluster.redis_usec")) and usec.value is not None:
        lines.append(f"  the scripts' time inside Redis (commandstats): {usec.value:.0f} us per "
                     "message; of it " + ", ".join(
                         f"{k} {v:.1f}" for k, v in sorted(usec.details.items(),
                                                            key=lambda kv: -kv[1]
                                                            if isinstance(kv[1], float) else 0)
                         if isinstance(v, float) and v >= 0.5 and k not in ("eval", "evalsha")))
    return "\n".join(lines)
