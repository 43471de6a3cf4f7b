"""A small SMTP sink that records when each message arrives.

smtp-sink counts messages but cannot say when a given message arrived, so the end-to-end
latency (from the client's ``250`` to arrival here) needs a sink of our own. Each message
carries an ``X-Bench-Id`` header from the load client; the sink keeps ``(id, time.time())``
for every message at its final ``.``. It never stores bodies (a 50 MB message passes
through in constant memory).

With ``--cert``/``--key`` it also offers STARTTLS, listens for implicit TLS on a second
port and accepts any AUTH PLAIN: then the load client's TLS ceiling can be measured without
a real server in between.

Control commands on the same port (the bench is its only client besides the MTAs):
``XCOUNT`` -> ``250 <messages>``, ``XDUMP <path>`` writes the arrivals as JSON, ``XRESET``,
``XSIGNED`` -> ``250 <messages with a DKIM-Signature header>``, ``XLASTSIGNED <path>``
writes the last of those (its first 16 KB: all of a bench message) for the bench to verify.

Run: ``python3 bench/sink.py --port P`` (prints ``READY <port> [<tls port>]`` once
listening).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import ssl
import sys
import time

ID_RE = re.compile(rb"\r\nX-Bench-Id: ([^\r\n]+)", re.I)
SIGNED_RE = re.compile(rb"\r\nDKIM-Signature:", re.I)
HEAD_KEEP = 16384  # bytes of each message searched for X-Bench-Id


class Arrivals:
    def __init__(self) -> None:
        self.items: list[tuple[str | None, float]] = []
        self.signed = 0
        self.last_signed = b""


class SinkProtocol(asyncio.Protocol):
    def __init__(self, arrivals: Arrivals, tls: ssl.SSLContext | None = None,
                 in_tls: bool = False) -> None:
        self.arrivals = arrivals
        self.tls, self.in_tls = tls, in_tls
        self.handshaking: bytearray | None = None  # data that arrived during STARTTLS
        self.buf = b""
        self.in_data = False
        self.head = bytearray()
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.handshaking is not None:
            # Decrypted data can arrive before start_tls() has returned the TLS transport
            # that the replies must go to: keep it until then.
            self.handshaking += data
            return
        while data:
            data = self._data_chunk(data) if self.in_data else self._commands(data)

    def _data_chunk(self, data: bytes) -> bytes:
        """Consume message bytes; returns what follows the end of data (pipelined commands)."""
        joined = self.tail + data
        end = joined.find(b"\r\n.\r\n")
        if end < 0:
            if len(self.head) < HEAD_KEEP:
                self.head += data[: HEAD_KEEP - len(self.head)]
            self.tail = joined[-4:]
            return b""
        cut = end - len(self.tail) + 5  # index in data just past the terminator
        if len(self.head) < HEAD_KEEP:
            self.head += data[: max(0, min(cut, HEAD_KEEP - len(self.head)))]
        head = b"\r\n" + bytes(self.head)
        m = ID_RE.search(head)
        self.arrivals.items.append((m.group(1).decode() if m else None, time.time()))
        headers = head[: head.find(b"\r\n\r\n") + 2]
        if SIGNED_RE.search(headers):
            self.arrivals.signed += 1
            self.arrivals.last_signed = head[2:]
        self.in_data = False
        self.transport.write(b"250 2.0.0 Ok: queued\r\n")
        return data[cut:]

    def _commands(self, data: bytes) -> bytes:
        self.buf += data
        while not self.in_data:
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                if len(self.buf) > 4096:
                    self.transport.close()
                return b""
            self.buf = rest
            self._command(line)
        leftover, self.buf = self.buf, b""
        return leftover

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.tls,
                                                  server_side=True)
        except (OSError, ssl.SSLError, ConnectionError):
            self.transport.close()
            return
        early, self.handshaking = bytes(self.handshaking), None
        if early:
            self.data_received(early)

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        w = self.transport.write
        if verb == b"EHLO":
            extra = b""
            if self.tls and not self.in_tls:
                extra += b"250-STARTTLS\r\n"
            if self.tls:
                extra += b"250-AUTH PLAIN\r\n"
            w(b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n" + extra +
              b"250-SIZE 1000000000\r\n250 ENHANCEDSTATUSCODES\r\n")
        elif verb == b"STAR" and self.tls and not self.in_tls:
            w(b"220 2.0.0 Ready to start TLS\r\n")
            self.buf = b""  # nothing sent before the handshake counts
            self.in_tls = True
            self.handshaking = bytearray()
            asyncio.ensure_future(self._start_tls())
        elif verb == b"AUTH" and self.tls:
            w(b"235 2.7.0 Authentication successful\r\n")
        elif verb == b"DATA":
            self.in_data = True
            self.head = bytearray()
            self.tail = b"\r\n"  # the CRLF of the DATA line: a lone "." ends at once
            w(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"QUIT":
            w(b"221 2.0.0 Bye\r\n")
            self.transport.close()
        elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            w(b"250 2.0.0 Ok\r\n")
        elif verb == b"XCOU":
            w(b"250 %d\r\n" % len(self.arrivals.items))
        elif verb == b"XRES":
            self.arrivals.items.clear()
            self.arrivals.signed, self.arrivals.last_signed = 0, b""
            w(b"250 reset\r\n")
        elif verb == b"XDUM":
            path = line[6:].decode().strip()
            with open(path, "w") as f:
                json.dump(self.arrivals.items, f)
            w(b"250 dumped\r\n")
        elif verb == b"XSIG":
            w(b"250 %d\r\n" % self.arrivals.signed)
        elif verb == b"XLAS":
            with open(line[12:].decode().strip(), "wb") as f:
                f.write(self.arrivals.last_signed)
            w(b"250 written\r\n")
        else:
            w(b"502 5.5.2 Command not recognized\r\n")


async def serve(host: str, port: int, lifetime: float, cert: str | None = None,
                key: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    arrivals = Arrivals()
    tls = None
    if cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
    server = await loop.create_server(lambda: SinkProtocol(arrivals, tls), host, port,
                                      backlog=1024)
    ports = [server.sockets[0].getsockname()[1]]
    servers = [server]
    if tls:
        implicit = await loop.create_server(lambda: SinkProtocol(arrivals, tls, True), host,
                                            0, backlog=1024, ssl=tls)
        servers.append(implicit)
        ports.append(implicit.sockets[0].getsockname()[1])
    print("READY " + " ".join(map(str, ports)), flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        await asyncio.wait_for(stop, lifetime)  # bounded: never outlives the bench
    except TimeoutError:
        pass
    for one in servers:
        one.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=4 * 3600,
                        help="exit after this many seconds in any case")
    parser.add_argument("--cert", help="PEM certificate: offer STARTTLS and implicit TLS")
    parser.add_argument("--key", help="PEM private key of --cert")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.lifetime, args.cert, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def control(port: int, command: str, host: str = "127.0.0.1", timeout: float = 30) -> str:
    """Send one control command to a running sink; returns the reply text after the code."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(command.encode() + b"\r\nQUIT\r\n")
        reply = f.readline().decode().strip()
    if not reply.startswith("250"):
        raise RuntimeError(f"sink: {command}: {reply}")
    return reply[4:]


class SinkProcess:
    """The sink run as a separate process (so it never shares a CPU-bound interpreter with
    the load client), stopped by its PID."""

    def __init__(self, lifetime: float = 4 * 3600, cert: str | None = None,
                 key: str | None = None) -> None:
        import subprocess

        tls = ["--cert", cert, "--key", key] if cert and key else []
        from bench.procs import die_with_this_process

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--port", "0", "--lifetime", str(lifetime), *tls],
            stdout=subprocess.PIPE, text=True, preexec_fn=die_with_this_process())
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"sink did not start: {line!r}")
        ports = [int(p) for p in line.split()[1:]]
        self.port = ports[0]
        self.tls_port = ports[1] if len(ports) > 1 else None

    def count(self) -> int:
        return int(control(self.port, "XCOUNT"))

    def reset(self) -> None:
        control(self.port, "XRESET")

    def arrivals(self, path: str) -> list[tuple[str | None, float]]:
        control(self.port, f"XDUMP {path}")
        with open(path) as f:
            return [tuple(item) for item in json.load(f)]

    def signed(self) -> int:
        """Messages since the last reset that arrived with a DKIM-Signature header."""
        return int(control(self.port, "XSIGNED"))

    def last_signed(self, path: str) -> bytes:
        """The last message that arrived signed (its first 16 KB, with the dot ending it)."""
        control(self.port, f"XLASTSIGNED {path}")
        with open(path, "rb") as f:
            return f.read()

    def wait_for(self, n: int, timeout: float, poll: float = 0.05) -> int:
        """Wait until the sink holds at least ``n`` messages (bounded); returns the count."""
        deadline = time.monotonic() + timeout
        count = self.count()
        while count < n and time.monotonic() < deadline:
            time.sleep(poll)
            count = self.count()
        return count

    def stop(self) -> None:
        from bench.procs import terminate

        terminate(self.proc, 10)
