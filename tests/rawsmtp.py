"""An SMTP client that sends exactly the bytes it is given (smtplib fixes line ends and
refuses 8-bit commands) and reads the replies as they come, for the tests of what the
relay makes of any input. Loopback only; every read is bounded by a timeout."""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time

# A reply line: a code, then a space (the last line) or a hyphen, then printable ASCII.
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([\x20-\x7e]*)")


class Raw:
    """One connection; ``tls`` wraps it at once (an implicit TLS listener)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None, timeout: float = 30.0,
                 greet: bool = True) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = tls.wrap_socket(sock, server_hostname="relay.test") if tls else sock
        self.received = b""  # everything read so far
        self._unread = b""
        if greet:
            self.reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> bytes:
        data = self.sock.recv(65536)
        self.received += data
        return data

    def reply(self) -> tuple[int, bytes]:
        """The next whole reply: its code and the text of its last line."""
        while True:
            end = self._unread.find(b"\r\n")
            if end >= 0:
                line, self._unread = self._unread[:end], self._unread[end + 2:]
                m = REPLY_LINE.fullmatch(line)
                assert m, f"not an SMTP reply line: {line!r}"
                if m.group(2) == b" ":
                    return int(m.group(1)), m.group(3)
                continue
            data = self._read()
            if not data:
                raise ConnectionError(f"closed before a whole reply: {self._unread!r}")
            self._unread += data

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def starttls(self, context: ssl.SSLContext) -> None:
        code, text = self.cmd(b"STARTTLS")
        assert code == 220, text
        self.sock = context.wrap_socket(self.sock, server_hostname="relay.test")

    def read_to_end(self, timeout: float) -> bytes:
        """Everything until the server closes the connection (or ``timeout`` passes, or
        the connection breaks); returns all bytes received on it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self._read():
                    break
            except (TimeoutError, ssl.SSLError, OSError):
                break
        return self.received


def plain(username: str, password: str) -> bytes:
    """An AUTH PLAIN command with its initial response."""
    return b"AUTH PLAIN " + base64.b64encode(f"\0{username}\0{password}".encode())
