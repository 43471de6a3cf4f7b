"""SMTP sessions fuzzed against the real twistd relay: the sessions of
tests/corpus/smtp_sessions.txt, mutated (line ends, NUL, 8-bit bytes, long lines, writes
joined into pipelines or split, STARTTLS and AUTH in odd places), sent over TCP on loopback.

Whatever a client sends: every reply line is a well-formed SMTP reply (an enhanced status
code on each refusal), the relay keeps running and serving, nothing is accepted without a
login, every accepted message is logged, and the log stays readable (strict UTF-8, every
line one event with a time stamp, no traceback).

Bounded and repeatable: SESSIONS sessions made from SEED (``MAILRELAY_FUZZ_SEED`` and
``MAILRELAY_FUZZ_SESSIONS`` change them); a failure names the session's writes.
"""

from __future__ import annotations

import codecs
import os
import random
import re
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import Relay, free_port, message, wait_for
from rawsmtp import REPLY_LINE, Raw

CORPUS = Path(__file__).with_name("corpus") / "smtp_sessions.txt"
SEED = int(os.environ.get("MAILRELAY_FUZZ_SEED", "19"))
SESSIONS = int(os.environ.get("MAILRELAY_FUZZ_SESSIONS", "160"))
PASSWORD = "correct horse battery"
STARTTLS, WAIT = "!starttls", "!wait"
END = b"\r\n.\r\nQUIT\r\n"  # ends a DATA phase if one is open, then the session
READY = b"220 2.0.0 Ready to start TLS\r\n"
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")
REFUSAL = re.compile(rb"[45][0-9][0-9] [45]\.[0-9]{1,3}\.[0-9]{1,3} ")
NASTY = [b"\r", b"\n", b"\x00", b"\r\n", b".\r\n", b"\r\n.\r\n", b" ", b":", b"<", b">",
         b"@", b"\xc3\xa9", b"\xed\xa0\x80", b"\xe2\x80\xa8", b"\xc2\x85", b"\x1b[2J",
         b"\t", b"=", b"*\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"DATA\r\n",
         b"BDAT 3\r\n", b"RSET\r\n"]

Write = bytes | str  # bytes to send, or a directive


def corpus() -> list[list[Write]]:
    sessions: list[list[Write]] = [[]]
    for line in CORPUS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line == "---":
            sessions.append([])
        elif line in (STARTTLS, WAIT):
            sessions[-1].append(line)
        else:
            line = re.sub(r"<<(.)\*(\d+)>>", lambda m: m.group(1) * int(m.group(2)), line)
            sessions[-1].append(codecs.escape_decode(line.encode("latin-1"))[0])
    return [s for s in sessions if s]


def mutate(rng: random.Random, session: list[Write], others: list[list[Write]]) -> list[Write]:
    writes = list(session)
    for _ in range(rng.randint(0, 4)):
        i = rng.randrange(len(writes)) if writes else 0
        chunk = writes[i] if writes and isinstance(writes[i], bytes) else b""
        kind = rng.randrange(10)
        if kind == 0 and chunk:  # a nasty byte sequence somewhere
            at = rng.randrange(len(chunk) + 1)
            writes[i] = chunk[:at] + rng.choice(NASTY) + chunk[at:]
        elif kind == 1 and chunk:  # a random byte changed
            at = rng.randrange(len(chunk))
            writes[i] = chunk[:at] + bytes([rng.randrange(256)]) + chunk[at + 1:]
        elif kind == 2 and len(writes) > 1:
            del writes[i]
        elif kind == 3 and writes:
            writes.insert(i, writes[i])
        elif kind == 4:  # a write of another session
            other = rng.choice(others)
            writes.insert(i, rng.choice(other))
        elif kind == 5 and i + 1 < len(writes) and chunk and isinstance(writes[i + 1], bytes):
            writes[i:i + 2] = [chunk + writes[i + 1]]  # pipelined together
        elif kind == 6 and len(chunk) > 1:
            at = rng.randrange(1, len(chunk))
            writes[i:i + 1] = [chunk[:at], chunk[at:]]  # one command in two segments
        elif kind == 7 and chunk:
            writes[i] = chunk[:rng.randrange(len(chunk))]
        elif kind == 8 and chunk:
            writes[i] = chunk.swapcase()
        elif kind == 9:
            writes.insert(i, rng.choice([STARTTLS, WAIT, b"\xff" * rng.randint(1, 3000)]))
    return writes


def sessions() -> list[list[Write]]:
    rng = random.Random(SEED)
    base = corpus()
    made = list(base)  # each session as written, then mutants
    while len(made) < SESSIONS:
        made.append(mutate(rng, rng.choice(base), base))
    return made


def settle(client: Raw, limit: float = 3.0) -> None:
    """Read replies until none comes for a moment (bounded). Reads time out rather than
    wait on select: a TLS socket is readable for a session ticket that carries no reply."""
    deadline = time.monotonic() + limit
    client.sock.settimeout(0.15)
    try:
        while time.monotonic() < deadline:
            if not client._read():
                return
    except (OSError, ssl.SSLError):  # quiet for a moment (TimeoutError), or closed
        return
    finally:
        client.sock.settimeout(15)


def run(port: int, context: ssl.SSLContext, writes: list[Write]) -> tuple[bytes, int]:
    """One session: everything the relay sent (what came inside TLS decrypted), and where
    TLS started (-1: never)."""
    client = Raw(port, greet=False, timeout=15)
    tls_at = -1
    try:
        for write in writes:
            if write == WAIT:
                settle(client)
            elif write == STARTTLS:
                settle(client)
                before = len(client.received)
                client.send(b"STARTTLS\r\n")
                settle(client)
                if client.received.endswith(READY) and len(client.received) > before:
                    client.sock = context.wrap_socket(client.sock,
                                                      server_hostname="relay.test")
                    tls_at = len(client.received)
            else:
                client.send(write)
        client.send(END)
    except (OSError, ssl.SSLError):
        pass  # the relay closed the connection: what it sent is checked
    received = client.read_to_end(timeout=15)
    client.close()
    return received, tls_at


def check_replies(received: bytes, tls_at: int) -> int:
    """The invariants of one session's replies; how many messages it had accepted."""
    ready = received.find(READY)
    if ready >= 0 and ready + len(READY) != tls_at:
        # STARTTLS sent as plain bytes: what follows the 220, if anything, is TLS
        received = received[:ready + len(READY)]
    assert received.endswith(b"\r\n"), f"a reply cut off: {received[-80:]!r}"
    logged_in, accepted = False, 0
    for line in received[:-2].split(b"\r\n"):
        assert REPLY_LINE.fullmatch(line), f"not an SMTP reply line: {line!r}"
        if line[:1] in b"45" and line[3:4] == b" ":
            assert REFUSAL.match(line), f"a refusal without an enhanced status: {line!r}"
        if line.startswith(b"235 "):
            logged_in = True
        elif line.startswith(b"220 2.0.0"):
            logged_in = False  # RFC 3207: TLS forgets the login
        elif line.startswith(b"250 2.0.0 Ok: queued as "):
            assert logged_in, "a message accepted without a login"
            accepted += 1
    return accepted


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    port = free_port()
    r = Relay(
        tmp_path_factory.mktemp("fuzz"),
        config=("[delivery]\nenabled = no\n\n"
                "[limits]\nidle_timeout = 5s\nmax_message_size = 100k\n\n"
                "[policy]\nlogin_delay_after = 100000\nlogin_block_after = 100000\n"
                "login_user_alert_after = 100000\n"),
        listeners=(f"[listener:smtp]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                   "tls = starttls\nplaintext_auth = yes\n"),
    )
    r.smtp_port = port
    r.admin("account", "set", "default", "--domains", "fuzz.test", "--notify",
            "it@fuzz.test")
    r.add_user("fuzz.test", PASSWORD)
    r.start()
    yield r
    r.stop()


def test_no_input_breaks_a_reply_the_relay_or_its_log(relay):
    made = sessions()
    context = relay.tls_context()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda w: run(relay.smtp_port, context, w), made))
    accepted = 0
    for writes, (received, tls_at) in zip(made, results, strict=True):
        try:
            accepted += check_replies(received, tls_at)
        except AssertionError as e:
            raise AssertionError(f"{e}\nseed {SEED}, session {writes!r}\n"
                                 f"replies {received[-600:]!r}") from None
    assert accepted > 0  # the corpus's good sessions still get through
    assert relay.process.poll() is None
    # Still serving, and every accepted message is in the log.
    with relay.smtp(login=("fuzz.test", PASSWORD)) as client:
        client.sendmail("a@fuzz.test", ["bob@example.net"], message("a@fuzz.test", "b@x.test"))
    accepted += 1
    wait_for(lambda: relay.log().count("] accepted ") == accepted, timeout=10,
             what=f"{accepted} accepted lines in the log")
    text = relay.log_path.read_bytes().decode("utf-8")  # strict: every line is UTF-8
    for line in text.splitlines():
        assert STAMP.match(line) or line.startswith("\t"), f"not a log line: {line!r}"
    for bad in ("Traceback", "Unhandled", "internal error", "#error]", "#critical]",
                "policy notice failed"):
        assert bad not in text, f"{bad!r} in the log"
    assert all("user=fuzz.test auth=password" in line
               for line in text.splitlines() if "] accepted " in line)
