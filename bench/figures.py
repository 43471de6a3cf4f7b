"""The figures of issue 7 and how each is measured against one running server.

A server is a PostfixInstance or a MailRelayInstance (the same duck-typed surface: ports,
start/stop, memory(), pause_delivery()/resume_delivery(), deferred(), ip_auth). Every
measurement is bounded in messages and in time; one that cannot be made (a feature the
server does not have yet, a refusal) gives a Value of None with the reason.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import procs
from bench.load import LoadResult, LoadSpec, hold_sessions, run_load
from bench.sink import SinkProcess

DOMAIN = "bench.test"
RECIPIENT = "rcpt@sink.test"
IP_SENDER = f"ip@{DOMAIN}"
USER = (f"bench@{DOMAIN}", "bench-secret-1", f"bench@{DOMAIN}")
SMTP_SOURCE = "/usr/sbin/smtp-source"
MB = 2**20

MODE_LABEL = {"plain": "IP auth, plain TCP", "starttls": "STARTTLS + AUTH PLAIN",
              "tls": "implicit TLS + AUTH PLAIN"}


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # "/s", "ms", "MB" or "s"
    higher_is_better: bool
    target: str = ""  # as the issue states it
    ratio_target: float | None = None  # mailrelay/Postfix at least this
    limit: float | None = None  # mailrelay's value below this (absolute target)
    tool: str = "load.py"


@dataclass
class Value:
    value: float | None
    note: str = ""
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    """How much each measurement sends; --smoke, --quick and the full run differ here."""

    accept_c1: int = 500
    accept_c20: int = 5000
    e2e: int = 5000
    sessions: int = 1000
    big_message: int = 50_000_000  # bytes, under the 50 MiB both servers allow
    spool: int = 100_000
    logins: int = 2000
    users: int = 1000
    run_timeout: float = 300.0
    drain_timeout: float = 60.0  # waiting for the sink, plus 1 s per 50 messages


SMOKE = Sizes(accept_c1=20, accept_c20=40, e2e=100, sessions=20, big_message=1_000_000,
              spool=100, logins=40, users=20, run_timeout=30.0, drain_timeout=5.0)
QUICK = Sizes(accept_c1=300, accept_c20=2000, e2e=2000, spool=10_000, logins=1000)
FULL = Sizes()


def all_figures(smtp_source: bool) -> list[Figure]:
    out = []
    for mode in ("plain", "starttls", "tls"):
        for conns in (1, 20):
            for per in (1, 10):
                out.append(Figure(f"accept.{mode}.c{conns}.m{per}",
                                  f"accept, {MODE_LABEL[mode]}, c={conns}, {per} msg/conn",
                                  "/s", True, ">= 1.5x", ratio_target=1.5))
        if mode == "plain" and smtp_source:
            out.append(Figure("accept.plain.c20.m1.smtp-source",
                              f"accept, {MODE_LABEL[mode]}, c=20, 1 msg/conn", "/s", True,
                              ">= 1.5x", ratio_target=1.5, tool="smtp-source"))
    out += [
        Figure("e2e.rate", "end to end to the sink, c=20, 1 msg/conn", "/s", True,
               ">= 1.5x", ratio_target=1.5, tool="load.py + sink.py"),
        Figure("e2e.p50", "latency 250 -> arrival at the sink, p50", "ms", False,
               tool="load.py + sink.py"),
        Figure("e2e.p99", "latency 250 -> arrival at the sink, p99", "ms", False,
               tool="load.py + sink.py"),
        Figure("mem.idle", "memory idle", "MB", False, tool="/proc"),
        Figure("mem.sessions", "memory with idle authenticated sessions", "MB", False,
               "< 150 MB", limit=150, tool="load.py + /proc"),
        Figure("mem.big", "memory peak minus idle, one big message", "MB", False,
               "< 10 MB", limit=10, tool="load.py + /proc"),
        Figure("spool.startup", "spool scale: startup with the queue full", "s", False,
               "< 5 s", limit=5, tool="/proc + 220 banner"),
        Figure("spool.rate", "spool scale: delivery rate of the queued messages", "/s", True,
               tool="sink.py"),
        Figure("login.one", "logins/s, one user (implicit TLS, c=20)", "/s", True),
        Figure("login.many", "logins/s, distinct users (implicit TLS, c=20)", "/s", True),
    ]
    return out


def dkim_figures() -> list[Figure]:
    """End to end with DKIM signing (RSA-2048) against the same without, in the same
    round: mailrelay signing in its delivery process, Postfix with OpenDKIM as a milter."""
    return [
        Figure("dkim.e2e.off", "end to end, c=20, signing off (rounds of the next row)",
               "/s", True, tool="load.py + sink.py"),
        Figure("dkim.e2e.rate", "end to end, c=20, DKIM-signed (RSA-2048)", "/s", True,
               ">= 1.5x", ratio_target=1.5, tool="load.py + sink.py"),
        Figure("dkim.cpu", "CPU per message added by signing", "ms", False, "< 0.7 ms",
               limit=0.7, tool="/proc"),
    ]


def many_users(n: int) -> dict[str, str]:
    """Login (an address) -> password for the distinct-users figures."""
    return {f"u{i:04d}@{DOMAIN}": "bench-secret-2" for i in range(n)}


def _users_list(users: dict[str, str]) -> list[tuple[str, str, str]]:
    return [(login, pw, login) for login, pw in users.items()]


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Measure:
    """Measurements of one server in one round."""

    def __init__(self, server, sink: SinkProcess, sizes: Sizes, workdir: str,
                 say: Callable[[str], None]) -> None:
        self.server, self.sink, self.sizes = server, sink, sizes
        self.workdir = workdir
        self.say = say
        self.users_many = _users_list(many_users(sizes.users))

    # ---- helpers ----

    def _spec(self, mode: str, **kw) -> LoadSpec:
        port = self.server.implicit_port if mode == "tls" else self.server.plain_port
        users = [("", "", IP_SENDER)] if mode == "plain" else [USER]
        kw.setdefault("users", users)
        kw.setdefault("timeout", self.sizes.run_timeout)
        return LoadSpec(port=port, mode=mode, recipient=RECIPIENT, **kw)

    def _drain(self, messages: int) -> float:
        return self.sizes.drain_timeout + messages / 50

    def _server_cpu(self) -> float:
        pid = self.server.pid
        return procs.tree_cpu(pid) if pid else 0.0

    def _load(self, what: str, spec: LoadSpec) -> tuple[LoadResult, dict]:
        """Run ``spec`` and wait for the sink to have what was accepted. Also returns the
        server's CPU per message in ms (all its processes, receiving and delivering) and
        the share of the machine's CPU that was busy while the clients sent."""
        before, cpu = self.sink.count(), self._server_cpu()
        machine = procs.machine_cpu()
        result = run_load(spec)
        busy = procs.busy_share(machine, procs.machine_cpu())
        if not spec.login_only and self.server.delivers:
            # Let the server deliver what it accepted before the next measurement starts.
            got = self.sink.wait_for(before + result.ok, timeout=self._drain(result.ok))
            if got < before + result.ok:
                self.say(f"{what}: only {got - before} of {result.ok} reached the sink")
        cpu_ms = 1e3 * (self._server_cpu() - cpu) / result.ok if result.ok else None
        self.say(f"{what}: {result.summary()}"
                 + (f", server CPU {cpu_ms:.2f} ms per item" if cpu_ms is not None else "")
                 + f", machine {_percent(busy)} busy")
        return result, {"server_cpu_ms": cpu_ms, "machine_busy": busy}

    @staticmethod
    def _from_result(result: LoadResult, value: float | None = None,
                     measured: dict | None = None) -> Value:
        if not result.ok:
            first = max(result.errors, key=result.errors.get) if result.errors else "no reply"
            return Value(None, f"failed: {first}")
        note = ""
        if result.failed:
            first = max(result.errors, key=result.errors.get)
            note = f"{result.failed} failed ({first})"
        return Value(result.rate if value is None else value, note,
                     {"ok": result.ok, "failed": result.failed, "cpu": result.cpu,
                      **(measured or {})})

    def _needs_delivery(self) -> Value | None:
        if not self.server.delivers:
            return Value(None, "n/a (not yet supported: delivery did not start)")
        return None

    def _needs_ip_auth(self) -> Value | None:
        if not self.server.ip_auth:
            return Value(None, "n/a (not yet supported: IP authentication)")
        return None

    # ---- figures ----

    def accept(self, mode: str, conns: int, per_conn: int) -> Value:
        if mode == "plain" and (na := self._needs_ip_auth()):
            return na
        total = self.sizes.accept_c1 if conns == 1 else self.sizes.accept_c20
        total = max(total, conns * per_conn)
        spec = self._spec(mode, conns=conns, per_conn=per_conn, total=total,
                          tag=f"a{mode}{conns}x{per_conn}")
        result, measured = self._load(f"accept {mode} c={conns} m={per_conn}", spec)
        return self._from_result(result, measured=measured)

    def accept_smtp_source(self) -> Value:
        if na := self._needs_ip_auth():
            return na
        total = self.sizes.accept_c20
        before, cpu = self.sink.count(), self._server_cpu()
        cmd = [SMTP_SOURCE, "-s", "20", "-m", str(total), "-l", "5120", "-f", IP_SENDER,
               "-t", RECIPIENT, f"{procs.HOST}:{self.server.plain_port}"]
        t0, machine = time.monotonic(), procs.machine_cpu()
        done = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=self.sizes.run_timeout)
        elapsed = time.monotonic() - t0
        busy = procs.busy_share(machine, procs.machine_cpu())
        if done.returncode != 0:
            return Value(None, f"smtp-source: {(done.stdout + done.stderr).strip()[:120]}")
        if self.server.delivers:
            self.sink.wait_for(before + total, timeout=self._drain(total))
        cpu_ms = 1e3 * (self._server_cpu() - cpu) / total
        self.say(f"accept plain c=20 m=1 smtp-source: {total} in {elapsed:.2f}s, "
                 f"server CPU {cpu_ms:.2f} ms per item, machine {_percent(busy)} busy")
        return Value(total / elapsed, "", {"server_cpu_ms": cpu_ms, "machine_busy": busy})

    def end_to_end(self) -> dict[str, Value]:
        if na := self._needs_ip_auth() or self._needs_delivery():
            return {"e2e.rate": na, "e2e.p50": na, "e2e.p99": na}
        n = self.sizes.e2e
        self.sink.reset()
        spec = self._spec("plain", conns=20, per_conn=1, total=n, keep_acks=True, tag="e2e")
        cpu, machine = self._server_cpu(), procs.machine_cpu()
        result = run_load(spec)
        got = self.sink.wait_for(result.ok, timeout=self._drain(result.ok))
        busy = procs.busy_share(machine, procs.machine_cpu())
        cpu_ms = 1e3 * (self._server_cpu() - cpu) / result.ok if result.ok else None
        self.say(f"end to end: {result.summary()}"
                 + (f", server CPU {cpu_ms:.2f} ms per item" if cpu_ms is not None else "")
                 + f", machine {_percent(busy)} busy")
        arrivals = self.sink.arrivals(os.path.join(self.workdir, "arrivals.json"))
        if not result.ok or not arrivals:
            na = self._from_result(result) if not result.ok else Value(None, "nothing arrived")
            return {"e2e.rate": na, "e2e.p50": na, "e2e.p99": na}
        last = max(t for _, t in arrivals)
        rate = Value(len(arrivals) / (last - result.start),
                     "" if got >= result.ok else f"{result.ok - got} never arrived",
                     {"server_cpu_ms": cpu_ms, "machine_busy": busy})
        latencies = [1e3 * (t - result.acks[i]) for i, t in arrivals if i in result.acks]
        if not latencies:
            na = Value(None, "no X-Bench-Id arrived")
            return {"e2e.rate": rate, "e2e.p50": na, "e2e.p99": na}
        return {"e2e.rate": rate, "e2e.p50": Value(_percentile(latencies, 0.50)),
                "e2e.p99": Value(_percentile(latencies, 0.99))}

    def signed_end_to_end(self, signing: bool, record: str | None) -> Value:
        """End to end (as ``end_to_end``) with the sink counting the messages that arrive
        with a DKIM-Signature header: all of them when ``signing``, none otherwise, else
        the figure fails; the last signed one must verify against ``record`` (the key's
        DNS TXT value). Details: the CPU per message of the server's signing process
        (``server.signing_cpu()``)."""
        cpu = self.server.signing_cpu()
        got = self.end_to_end()["e2e.rate"]
        signing_ms = self.server.signing_cpu() - cpu
        arrived, signed = self.sink.count(), self.sink.signed()
        if got.value is None:
            return got
        got.details.update(arrived=arrived, signed=signed,
                           signing_cpu_ms=1e3 * signing_ms / arrived if arrived else None)
        self.say(f"{'signed' if signing else 'unsigned'} end to end: {signed} of {arrived} "
                 f"arrived with a DKIM-Signature, signing process CPU "
                 f"{got.details['signing_cpu_ms']:.3f} ms per message")
        if signing and signed < arrived:
            return Value(None, f"FAILED: only {signed} of {arrived} arrived signed")
        if not signing and signed:
            return Value(None, f"FAILED: {signed} of {arrived} arrived signed, signing off")
        if signing:
            why = _dkim_check(self.sink.last_signed(os.path.join(self.workdir, "signed.eml")),
                              record)
            if why:
                return Value(None, f"FAILED: the signature does not verify ({why})")
            got.details["verified"] = True
        return got

    def memory_idle(self) -> Value:
        time.sleep(1.0)  # let startup work settle
        return Value(self.server.memory() / MB)

    def memory_sessions(self) -> Value:
        n = self.sizes.sessions
        spec = self._spec("tls", conns=n, users=self.users_many)
        before = self.server.memory() / MB

        def measure(opened: int, failed: int) -> Value:
            time.sleep(0.5)
            mem = self.server.memory() / MB
            self.say(f"{opened} idle sessions open ({failed} failed): {mem:.1f} MB "
                     f"({before:.1f} MB before they opened)")
            if not opened:
                return Value(None, "no session could log in")
            note = f"only {opened} of {n} sessions" if opened < n else ""
            return Value(mem, note, {"sessions": opened, "before": before})

        return hold_sessions(spec, measure)

    def memory_big(self) -> Value:
        size = self.sizes.big_message
        baseline = self.server.memory()
        pid = self.server.pid
        hwm_ok = bool(pid) and procs.reset_hwm(pid)
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                try:
                    peak[0] = max(peak[0], self.server.memory())
                except OSError:
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            spec = self._spec("tls", conns=1, per_conn=1, total=1, size=size, tag="big")
            result, _ = self._load(f"one {size / 1e6:.0f} MB message", spec)
        finally:
            stop.set()
            sampler.join(5)
        if not result.ok:
            return self._from_result(result)
        top = peak[0]
        if hwm_ok and not procs.children(pid):
            top = max(top, procs.hwm(pid))
        return Value((top - baseline) / MB, "", {"bytes": size})

    def logins(self, many: bool) -> Value:
        # Distinct users log in once each: every login is a password verification.
        users = self.users_many if many else [USER]
        total = len(users) if many else self.sizes.logins
        spec = self._spec("tls", conns=20, total=total, users=users, login_only=True,
                          tag="login")
        result, measured = self._load(f"logins ({len(users)} users)", spec)
        return self._from_result(result, measured=measured)

    def spool_scale(self) -> dict[str, Value]:
        """Queue ``sizes.spool`` messages with delivery paused, restart with delivery on:
        startup (until the 220) and delivery rate (until the sink has them all)."""
        n = self.sizes.spool
        if na := self._needs_delivery():
            return {"spool.startup": na, "spool.rate": na}
        self.server.pause_delivery()
        spec = self._spec("tls", conns=20, per_conn=100, total=n, tag="spool",
                          timeout=max(self.sizes.run_timeout, n / 20))
        result = run_load(spec)
        self.say(f"spool fill: {result.summary()}")
        if not result.ok:
            na = self._from_result(result)
            self.server.resume_delivery()
            return {"spool.startup": na, "spool.rate": na}
        deadline = time.monotonic() + max(60.0, n / 100)
        while self.server.deferred() < result.ok and time.monotonic() < deadline:
            time.sleep(0.2)
        queued = self.server.deferred()
        self.sink.reset()
        t0 = time.time()
        startup = self.server.resume_delivery()
        got = self.sink.wait_for(result.ok, timeout=self._drain(n), poll=0.2)
        arrivals = self.sink.arrivals(os.path.join(self.workdir, "arrivals.json"))
        self.say(f"spool: {queued} queued, startup {startup:.2f}s, {got} delivered")
        note = f"{queued} queued" + ("" if got >= result.ok else f", {got} delivered")
        startup_v = Value(startup, note)
        if not arrivals:
            return {"spool.startup": startup_v, "spool.rate": Value(None, "nothing delivered")}
        # The rate counts from the moment the server answered, so that it does not
        # include the startup, which has its own figure.
        last = max(t for _, t in arrivals)
        return {"spool.startup": startup_v,
                "spool.rate": Value(len(arrivals) / (last - t0 - startup), note)}


def _dkim_check(message: bytes, record: str | None) -> str:
    """Why the DKIM signature of a message as the sink received it (dot-stuffed, with the
    final dot) does not verify with ``record``; "" when it does."""
    import dkim

    if record is None:
        return "no key"
    if message.endswith(b"\r\n.\r\n"):
        message = message[:-3]
    message = message.replace(b"\r\n..", b"\r\n.")
    try:
        ok = dkim.verify(message, dnsfunc=lambda _name, timeout=5: record.encode())
    except dkim.DKIMException as e:
        return str(e)
    return "" if ok else "dkimpy says no"


def median(values: list[Value]) -> Value:
    nums = [v.value for v in values if v.value is not None]
    notes = sorted({v.note for v in values if v.note})
    if not nums:
        return Value(None, notes[0] if notes else "n/a")
    details: dict = {}
    for v in values:  # counts and flags: the last round's
        details.update(v.details)
    details["rounds"] = nums
    for key in ("server_cpu_ms", "machine_busy", "signing_cpu_ms"):
        known = [v.details[key] for v in values if v.details.get(key) is not None]
        if known:
            details[key] = statistics.median(known)
    return Value(statistics.median(nums), "; ".join(notes), details)


def smtp_source_available() -> bool:
    return os.access(SMTP_SOURCE, os.X_OK)

