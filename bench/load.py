"""The bench's SMTP load client: N concurrent connections, M messages per connection.

Modes: ``plain`` (no AUTH: the server authenticates the client by its IP address),
``starttls`` (STARTTLS, then AUTH PLAIN) and ``tls`` (implicit TLS, then AUTH PLAIN).
It pipelines MAIL/RCPT/DATA when the server offers PIPELINING, reports the rate until the
last ``250`` and the failures, and keeps the time of every ``250`` by message id (the
``X-Bench-Id`` header) for the end-to-end latency. Every run is bounded in messages and in
time. ``--procs K`` spreads the connections over K processes so that the client is not
the bottleneck (measure its ceiling against a sink first: ``--help``).

Run: ``python3 bench/load.py --port 2525 --mode plain --conns 20 --per-conn 1 --total 2000``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import itertools
import json
import multiprocessing
import os
import resource
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from typing import TypeVar

MODES = ("plain", "starttls", "tls")
T = TypeVar("T")


@dataclass
class LoadSpec:
    port: int
    host: str = "127.0.0.1"
    mode: str = "plain"
    # (login, password, sender) tuples; sessions take them round-robin. For plain mode only
    # the sender is used.
    users: list[tuple[str, str, str]] = field(default_factory=lambda: [("", "", "")])
    recipient: str = "rcpt@sink.test"
    conns: int = 1
    per_conn: int = 1
    total: int = 100
    size: int = 5120  # bytes of message, headers included
    timeout: float = 120.0  # the whole run
    tag: str = "run"  # prefix of X-Bench-Id
    procs: int = 1
    login_only: bool = False  # connect, (TLS), AUTH, QUIT: for logins per second
    keep_acks: bool = False


@dataclass
class LoadResult:
    ok: int = 0  # messages (or logins) that got their 2xx
    failed: int = 0
    start: float = 0.0  # time.time() when sending began
    last: float = 0.0  # time.time() of the last success
    cpu: float = 0.0  # client CPU seconds (user + system, all processes)
    errors: dict[str, int] = field(default_factory=dict)  # first line of a failure -> count
    acks: dict[str, float] = field(default_factory=dict)  # X-Bench-Id -> time of its 250

    @property
    def elapsed(self) -> float:
        return max(self.last - self.start, 1e-9) if self.ok else 0.0

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.ok else 0.0

    def merge(self, other: LoadResult) -> None:
        self.ok += other.ok
        self.failed += other.failed
        self.start = min(self.start, other.start) if self.start else other.start
        self.last = max(self.last, other.last)
        self.cpu += other.cpu
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        self.acks.update(other.acks)

    def summary(self) -> str:
        text = f"{self.ok} ok, {self.failed} failed, {self.rate:.0f}/s"
        if self.ok:
            text += f", client CPU {1e3 * self.cpu / self.ok:.2f} ms per item"
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            text += f"; first error kind: {worst!r} x{self.errors[worst]}"
        return text


class SmtpError(Exception):
    pass


def client_tls_context() -> ssl.SSLContext:
    # The bench talks to its own servers on loopback with a self-signed certificate; the
    # cost measured is the server's, so the client does not verify.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message_template(size: int, sender: str, recipient: str) -> tuple[bytes, bytes]:
    """Headers before X-Bench-Id, and everything after it up to the final CRLF.CRLF:
    ``size`` bytes in all (short header lines, 76-character body lines, no leading dots)."""
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench\r\n"
            f"Date: {formatdate(localtime=False)}\r\nMessage-ID: <").encode()
    line = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 the quick brow\r\n"
    fill = max(0, size - len(head) - 80)
    body = (line * (fill // len(line) + 1))[:fill]
    body = body[: body.rfind(b"\r\n") + 2] if b"\r\n" in body else b""
    return head, body


class Session:
    """One SMTP connection driven by asyncio streams."""

    def __init__(self, spec: LoadSpec, user: tuple[str, str, str], ctx: ssl.SSLContext | None):
        self.spec, self.user, self.ctx = spec, user, ctx
        self.pipelining = False

    async def reply(self) -> tuple[int, bytes]:
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpError("connection closed")
            if line[3:4] != b"-":
                return int(line[:3]), line

    async def expect(self, code: int) -> None:
        got, line = await self.reply()
        if got != code:
            raise SmtpError(line.decode(errors="replace").strip())

    async def ehlo(self) -> None:
        self.writer.write(b"EHLO bench-client.localdomain\r\n")
        features = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpError("connection closed")
            features.append(line[4:].strip().upper())
            if line[3:4] != b"-":
                break
        if not line.startswith(b"250"):
            raise SmtpError(line.decode(errors="replace").strip())
        self.pipelining = b"PIPELINING" in features

    async def open(self) -> None:
        s = self.spec
        self.reader, self.writer = await asyncio.open_connection(
            s.host, s.port, ssl=self.ctx if s.mode == "tls" else None,
            limit=2**20)
        await self.expect(220)
        await self.ehlo()
        if s.mode == "starttls":
            self.writer.write(b"STARTTLS\r\n")
            await self.expect(220)
            await self.writer.start_tls(self.ctx)
            await self.ehlo()
        if s.mode != "plain":
            login, password, _ = self.user
            token = base64.b64encode(f"\0{login}\0{password}".encode())
            self.writer.write(b"AUTH PLAIN " + token + b"\r\n")
            await self.expect(235)

    async def send(self, head: bytes, bench_id: bytes, body: bytes) -> None:
        sender, rcpt = self.user[2], self.spec.recipient
        cmds = [f"MAIL FROM:<{sender}>\r\n".encode(), f"RCPT TO:<{rcpt}>\r\n".encode(),
                b"DATA\r\n"]
        if self.pipelining:
            self.writer.write(b"".join(cmds))
            for code in (250, 250, 354):
                await self.expect(code)
        else:
            for cmd, code in zip(cmds, (250, 250, 354), strict=True):
                self.writer.write(cmd)
                await self.expect(code)
        self.writer.write(b"".join((head, bench_id, b"@bench.test>\r\nX-Bench-Id: ", bench_id,
                                    b"\r\n\r\n", body, b".\r\n")))
        await self.expect(250)

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        except (OSError, SmtpError, TimeoutError, ssl.SSLError):
            pass
        self.writer.close()


async def _run(spec: LoadSpec, worker: int, start_at: float) -> LoadResult:
    result = LoadResult()
    ctx = client_tls_context() if spec.mode != "plain" else None
    users = itertools.cycle(spec.users)
    templates = {u[2]: message_template(spec.size, u[2], spec.recipient) for u in spec.users}
    budget = [spec.total]
    serial = itertools.count()
    errors: collections.Counter[str] = collections.Counter()
    loop = asyncio.get_running_loop()

    def fail(n: int, exc: BaseException) -> None:
        result.failed += n
        errors[(str(exc) or type(exc).__name__)[:120]] += n

    async def connection_loop() -> None:
        while budget[0] > 0:
            n = 1 if spec.login_only else min(spec.per_conn, budget[0])
            budget[0] -= n
            session = Session(spec, next(users), ctx)
            head, body = templates[session.user[2]]
            done = 0
            try:
                await session.open()
                if spec.login_only:
                    result.ok += 1
                    result.last = time.time()
                    done = 1
                for _ in range(n - done):
                    bench_id = f"{spec.tag}-{worker}-{next(serial)}".encode()
                    await session.send(head, bench_id, body)
                    now = time.time()
                    result.ok += 1
                    result.last = now
                    done += 1
                    if spec.keep_acks:
                        result.acks[bench_id.decode()] = now
                await session.close()
            except asyncio.CancelledError:  # the run's time is up
                fail(n - done, TimeoutError("run timed out"))
                raise
            except Exception as e:  # any failure of a session counts against its messages
                fail(n - done, e)
                if hasattr(session, "writer"):
                    session.writer.close()

    await asyncio.sleep(max(0.0, start_at - time.time()))
    result.start = time.time()
    cpu0 = _cpu()
    tasks = [asyncio.ensure_future(connection_loop()) for _ in range(spec.conns)]
    deadline = loop.time() + spec.timeout
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.gather(*tasks)
    except TimeoutError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        fail(budget[0], TimeoutError("run timed out"))
        budget[0] = 0
    result.cpu = _cpu() - cpu0
    result.errors = dict(errors)
    return result


async def _hold(spec: LoadSpec, on_held: Callable[[int, int], T]) -> T:
    ctx = client_tls_context() if spec.mode != "plain" else None
    users = itertools.cycle(spec.users)
    opening = asyncio.Semaphore(50)  # bounded burst of handshakes
    sessions: list[Session] = []

    async def open_one() -> None:
        session = Session(spec, next(users), ctx)
        async with opening:
            try:
                await session.open()
                sessions.append(session)
            except Exception:
                if hasattr(session, "writer"):
                    session.writer.close()

    tasks = [asyncio.ensure_future(open_one()) for _ in range(spec.conns)]
    try:
        async with asyncio.timeout(spec.timeout):
            await asyncio.gather(*tasks)
    except TimeoutError:  # measure with the sessions that did open
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    try:
        return on_held(len(sessions), spec.conns - len(sessions))
    finally:
        await asyncio.gather(*(asyncio.wait_for(s.close(), 5) for s in sessions),
                             return_exceptions=True)


def hold_sessions(spec: LoadSpec, on_held: Callable[[int, int], T]) -> T:
    """Open ``spec.conns`` sessions (TLS and AUTH as the mode says), call
    ``on_held(opened, failed)`` while they are all open and idle, then close them; returns
    what ``on_held`` returned."""
    return asyncio.run(_hold(spec, on_held))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _worker(args: tuple[LoadSpec, int, float]) -> dict:
    spec, worker, start_at = args
    result = asyncio.run(_run(spec, worker, start_at))
    return asdict(result)


def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load and return the merged result (blocking)."""
    if spec.mode not in MODES:
        raise ValueError(f"mode {spec.mode!r}: use one of {', '.join(MODES)}")
    procs = max(1, min(spec.procs, spec.conns))
    if procs == 1:
        return asyncio.run(_run(spec, 0, time.time()))
    parts = []
    for i in range(procs):
        conns = spec.conns // procs + (i < spec.conns % procs)
        total = spec.total // procs + (i < spec.total % procs)
        users = spec.users[i::procs] or spec.users
        parts.append(LoadSpec(**{**asdict(spec), "conns": conns, "total": total,
                                 "users": users, "procs": 1}))
    start_at = time.time() + 0.3 + 0.05 * procs  # all workers start together
    merged = LoadResult()
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        for part in pool.map(_worker, [(p, i, start_at) for i, p in enumerate(parts)]):
            merged.merge(LoadResult(**part))
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=MODES, default="plain")
    p.add_argument("--user", default="", help="login for AUTH PLAIN")
    p.add_argument("--password", default="")
    p.add_argument("--sender", default="bench@bench.test")
    p.add_argument("--recipient", default="rcpt@sink.test")
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--per-conn", type=int, default=1)
    p.add_argument("--total", type=int, default=100)
    p.add_argument("--size", type=int, default=5120)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--login-only", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    spec = LoadSpec(port=a.port, host=a.host, mode=a.mode,
                    users=[(a.user, a.password, a.sender)], recipient=a.recipient,
                    conns=a.conns, per_conn=a.per_conn, total=a.total, size=a.size,
                    timeout=a.timeout, procs=a.procs, login_only=a.login_only,
                    tag=f"cli{os.getpid()}")
    result = run_load(spec)
    if a.json:
        out = asdict(result)
        out.pop("acks")
        print(json.dumps({**out, "rate": result.rate}))
    else:
        print(result.summary())
    return 0 if result.ok and not result.failed else 1


if __name__ == "__main__":
    sys.exit(main())
