"""A small HTTP receiver for webhook events: answers every POST ``200`` and counts them.

The webhook rows point mailrelay's endpoint here (on loopback, ``[webhooks]
allow_private``), so the bench can tell that every event was sent: the count must equal
messages x events. Requests are read with their ``Content-Length`` body and connections
kept alive as HTTP/1.1 allows; bodies are not kept (only the event types are counted).

Control on the same port: ``GET /count`` -> the POSTs since the last ``GET /reset``, as
``{"posts": N, "types": {...}}``. The process exits by itself after ``--lifetime``.

Run: ``python3 bench/hooksink.py`` (prints ``READY <port>`` once listening).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
import urllib.request

TYPE_RE = re.compile(rb'"type":\s*"([a-z.]+)"')
MAX_HEAD = 65536  # a request head longer than this closes the connection
MAX_BODY = 1 << 20


class Counts:
    def __init__(self) -> None:
        self.posts = 0
        self.types: dict[str, int] = {}


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                counts: Counts) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEAD:
                break
            line, *fields = head.decode("latin-1").split("\r\n")
            method, path, _ = line.split(" ", 2)
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (f.partition(":") for f in fields if f)}
            length = min(int(headers.get("content-length", "0")), MAX_BODY)
            body = await reader.readexactly(length) if length else b""
            if method == "POST":
                counts.posts += 1
                kind = TYPE_RE.search(body)
                name = kind.group(1).decode() if kind else "?"
                counts.types[name] = counts.types.get(name, 0) + 1
                answer = b""
            elif path == "/reset":
                counts.posts, counts.types = 0, {}
                answer = b"{}"
            else:
                answer = json.dumps({"posts": counts.posts, "types": counts.types}).encode()
            close = headers.get("connection", "").lower() == "close"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n%s\r\n%s"
                         % (len(answer), b"Connection: close\r\n" if close else b"", answer))
            if close:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
            ValueError):
        pass
    finally:
        writer.close()


async def main(port: int, lifetime: float) -> None:
    counts = Counts()
    server = await asyncio.start_server(lambda r, w: serve(r, w, counts), "127.0.0.1", port,
                                        limit=MAX_HEAD)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await asyncio.sleep(lifetime)


class HookSinkProcess:
    """The receiver as a separate process, stopped by its PID."""

    def __init__(self, lifetime: float = 3600) -> None:
        import subprocess

        from bench.procs import die_with_this_process

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--lifetime", str(lifetime)], stdout=subprocess.PIPE,
            text=True, preexec_fn=die_with_this_process())
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"webhook receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def counts(self) -> dict:
        return self._get("/count")

    def reset(self) -> None:
        self._get("/reset")

    def wait_for(self, n: int, timeout: float, poll: float = 0.1) -> int:
        """Wait until ``n`` POSTs arrived (bounded); returns the count."""
        deadline = time.monotonic() + timeout
        got = self.counts()["posts"]
        while got < n and time.monotonic() < deadline:
            time.sleep(poll)
            got = self.counts()["posts"]
        return got

    def cpu(self) -> float:
        from bench.procs import tree_cpu

        return tree_cpu(self.proc.pid) if self.proc.poll() is None else 0.0

    def stop(self) -> None:
        from bench.procs import terminate

        terminate(self.proc, 10)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--lifetime", type=float, default=3600)
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main(a.port, a.lifetime))
