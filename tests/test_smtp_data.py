"""The DATA reader on its own: end detection, unstuffing and refusals, for every way the
network can cut the data into chunks."""

from __future__ import annotations

import random

import pytest

from mailrelay.smtp.data import (
    BARE_NEWLINE,
    HEADER_TOO_LONG,
    LINE_TOO_LONG,
    MAX_HEADER,
    MAX_LINE,
    NUL,
    DataReader,
)


class Sink:
    def __init__(self, refuse_headers=None) -> None:
        self.out = bytearray()
        self.headers: list[bytes] = []
        self.refuse_headers = refuse_headers

    def write(self, data: bytes) -> None:
        self.out += data

    def check(self, header: bytes):
        self.headers.append(header)
        return self.refuse_headers


def read(stream: bytes, cuts=(), max_size=10**9, sink=None):
    """Feed ``stream`` cut at ``cuts``; (reader, sink, bytes used up to the end or -1)."""
    sink = sink or Sink()
    reader = DataReader(sink.write, max_size, sink.check)
    pos = 0
    for cut in [*sorted(cuts), len(stream)]:
        chunk = stream[pos:cut]
        if not chunk:
            continue
        used = reader.feed(chunk)
        if used >= 0:
            return reader, sink, pos + used
        pos = cut
    return reader, sink, -1


def reference(stream: bytes):
    """What the whole stream means, computed the slow, obvious way."""
    s = b"\r\n" + stream
    i = s.find(b"\r\n.\r\n")
    if i < 0:
        return -1, None, None
    end, raw = i + 3, s[2 : i + 2]
    lines = raw.split(b"\r\n")
    if raw.count(b"\r") != raw.count(b"\r\n") or raw.count(b"\n") != raw.count(b"\r\n"):
        return end, "refused", None
    if b"\0" in raw or any(len(line) > MAX_LINE - 2 for line in lines):
        return end, "refused", None
    body = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    return end, None, body


def test_simple_message_and_unstuffing() -> None:
    stream = b"From: a@x.example\r\n\r\n..dot\r\n..\r\n...\r\nend\r\n.\r\nQUIT\r\n"
    reader, sink, used = read(stream)
    assert used == stream.index(b"QUIT")
    assert reader.error is None
    assert bytes(sink.out) == b"From: a@x.example\r\n\r\n.dot\r\n.\r\n..\r\nend\r\n"
    assert sink.headers == [b"From: a@x.example"]
    assert reader.size == len(sink.out)


def test_first_line_dot_ends_at_once() -> None:
    reader, sink, used = read(b".\r\nMAIL FROM:<x@y.example>\r\n")
    assert used == 3 and sink.out == b"" and sink.headers == [b""]


@pytest.mark.parametrize(
    "variant",
    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r"],
)
def test_smuggling_variants_do_not_end_data_and_are_refused(variant: bytes) -> None:
    smuggled = b"MAIL FROM:<ceo@victim.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nevil\r\n"
    stream = b"From: a@x.example\r\n\r\nfirst body" + variant + smuggled + b".\r\n"
    reader, _, used = read(stream)
    assert used == len(stream)  # one end only: the real CRLF.CRLF
    assert reader.error is BARE_NEWLINE


@pytest.mark.parametrize("variant", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"])
def test_nul_refused(variant: bytes) -> None:
    reader, _, used = read(b"From: a@x.example\r\n\r\nbody" + variant + b"x\r\n.\r\n")
    assert reader.error is NUL and used > 0


def test_dot_space_line_is_data() -> None:
    reader, sink, used = read(b"From: a@x.example\r\n\r\n. \r\n.\r\n")
    assert reader.error is None and sink.out.endswith(b"\r\n \r\n")


def test_long_line_then_commands_stay_data() -> None:
    commands = b"\r\nMAIL FROM:<ceo@victim.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nhi\r\n"
    stream = b"From: a@x.example\r\n\r\n" + b"x" * 20000 + commands + b".\r\nQUIT\r\n"
    for cuts in ([], [100, 5000, 20010], list(range(1, len(stream), 997))):
        reader, _, used = read(stream, cuts)
        assert reader.error is LINE_TOO_LONG
        assert stream[used:] == b"QUIT\r\n"


def test_line_limit_is_1000_with_crlf() -> None:
    ok = b"From: a@x.example\r\n\r\n" + b"x" * (MAX_LINE - 2) + b"\r\n.\r\n"
    assert read(ok)[0].error is None
    long = b"From: a@x.example\r\n\r\n" + b"x" * (MAX_LINE - 1) + b"\r\n.\r\n"
    assert read(long)[0].error is LINE_TOO_LONG
    assert read(long, [30, 500])[0].error is LINE_TOO_LONG


def test_unterminated_line_memory_is_bounded() -> None:
    sink = Sink()
    reader = DataReader(sink.write, 10**9, sink.check)
    assert reader.feed(b"From: a@x.example\r\n\r\n") == -1
    for _ in range(200):  # 12.8 MB with no line end
        assert reader.feed(b"y" * 65536) == -1
        assert reader.buffered <= MAX_LINE + 1
    assert reader.error is LINE_TOO_LONG
    assert reader.feed(b"\r\n.\r\nNOOP\r\n") == 5


def test_over_size_stops_writing() -> None:
    body = b"From: a@x.example\r\n\r\n" + b"z" * 70 + b"\r\n"
    stream = body * 100 + b".\r\n"
    reader, sink, used = read(stream, range(0, len(stream), 500), max_size=1000)
    assert used == len(stream)
    assert reader.error.code == 552 and reader.error.status == "5.3.4"
    assert len(sink.out) <= 1000


def test_header_section_collected_across_chunks_and_checked_once() -> None:
    header = b"Subject: s\r\nFrom: a@x.example\r\n folded\r\nTo: b@y.example"
    stream = header + b"\r\n\r\nbody\r\n\r\nmore: not a header\r\n.\r\n"
    for cut in range(1, len(stream)):
        reader, sink, _ = read(stream, [cut])
        assert sink.headers == [header], cut
        assert bytes(sink.out) == stream[:-3]


def test_header_refusal_keeps_reading_to_the_end() -> None:
    sink = Sink(refuse_headers=BARE_NEWLINE)
    reader, sink, used = read(b"From: x@evil.example\r\n\r\nbody\r\n.\r\nRSET\r\n", sink=sink)
    assert reader.error is BARE_NEWLINE and sink.out == b""
    assert used == len(b"From: x@evil.example\r\n\r\nbody\r\n.\r\n")


def test_header_only_message_is_checked_at_the_end() -> None:
    reader, sink, _ = read(b"From: a@x.example\r\nSubject: s\r\n.\r\n")
    assert sink.headers == [b"From: a@x.example\r\nSubject: s\r\n"]


def test_header_section_too_long() -> None:
    stream = b"From: a@x.example\r\n" + b"X-Pad: " + b"p" * 900 + b"\r\n"
    stream = stream * (MAX_HEADER // 900 + 10) + b"\r\nbody\r\n.\r\n"
    reader, sink, used = read(stream, range(0, len(stream), 4096))
    assert reader.error is HEADER_TOO_LONG and used == len(stream)
    assert sink.headers == []


def test_random_streams_and_cuts_match_the_reference() -> None:
    rng = random.Random(2024)
    tokens = [b"a", b"bc", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n..", b"\0", b"x" * 600]
    for _ in range(3000):
        stream = b"".join(rng.choice(tokens) for _ in range(rng.randint(0, 30)))
        stream += rng.choice([b"\r\n.\r\n", b".\r\n", b"", b"\r\n.\r\nNEXT\r\n"])
        expected_end, refusal, body = reference(stream)
        cuts = rng.sample(range(1, max(2, len(stream))), min(rng.randint(0, 8), len(stream) - 1)) \
            if len(stream) > 1 else []
        reader, sink, used = read(stream, cuts)
        assert used == expected_end, (stream, cuts)
        if expected_end < 0:
            continue
        if refusal:
            assert reader.error is not None, (stream, cuts)
        else:
            assert reader.error is None, (stream, cuts, reader.error)
            assert bytes(sink.out) == body, (stream, cuts)
