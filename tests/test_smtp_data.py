"""The DATA reader on its own: end detection, unstuffing and refusals, for every way the
network can cut the data into chunks."""

from __future__ import annotations

import random

import pytest

from mailrelay.reply import Reply
from mailrelay.smtp.data import (
    BARE_NEWLINE,
    HEADER_TOO_LONG,
    LINE_TOO_LONG,
    LONG_LINE,
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


def refused(reader: DataReader, reason: tuple[int, str, str]) -> bool:
    """The message was refused for ``reason`` (the module's arguments for the Reply)."""
    error = reader.error
    return error is not None and (error.code, error.status, error.text) == reason


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
    if b"\0" in raw or any(len(line) > LONG_LINE - 2 for line in lines):
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
    assert refused(reader, BARE_NEWLINE)


@pytest.mark.parametrize("variant", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"])
def test_nul_refused(variant: bytes) -> None:
    reader, _, used = read(b"From: a@x.example\r\n\r\nbody" + variant + b"x\r\n.\r\n")
    assert refused(reader, NUL) and used > 0


def test_dot_space_line_is_data() -> None:
    reader, sink, used = read(b"From: a@x.example\r\n\r\n. \r\n.\r\n")
    assert reader.error is None and sink.out.endswith(b"\r\n \r\n")


def test_long_line_then_commands_stay_data() -> None:
    commands = b"\r\nMAIL FROM:<ceo@victim.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nhi\r\n"
    stream = b"From: a@x.example\r\n\r\n" + b"x" * 70000 + commands + b".\r\nQUIT\r\n"
    for cuts in ([], [100, 5000, 70010], list(range(1, len(stream), 997))):
        reader, _, used = read(stream, cuts)
        assert refused(reader, LINE_TOO_LONG)
        assert stream[used:] == b"QUIT\r\n"


def test_long_lines_are_accepted_up_to_the_bound_and_noted() -> None:
    head = b"From: a@x.example\r\n\r\n"
    ok = head + b"x" * (MAX_LINE - 2) + b"\r\n.\r\n"
    reader = read(ok)[0]
    assert reader.error is None and not reader.long_lines
    for length in (MAX_LINE - 1, 5000, LONG_LINE - 2):
        body = b"short\r\n" + b"y" * length + b"\r\n.dot\r\n"
        for cuts in ([], [30, 500], range(7, len(head + body), 4093)):
            reader, sink, _ = read(head + body + b".\r\n", cuts)
            assert reader.error is None and reader.long_lines, (length, cuts)
            assert bytes(sink.out) == head + body.replace(b"\n.dot", b"\ndot")
    long = head + b"x" * (LONG_LINE - 1) + b"\r\n.\r\n"
    assert refused(read(long)[0], LINE_TOO_LONG)
    assert refused(read(long, [30, 500, 40000])[0], LINE_TOO_LONG)
    assert "65536 octets" in LINE_TOO_LONG[2]


def test_unterminated_line_memory_is_bounded() -> None:
    sink = Sink()
    reader = DataReader(sink.write, 10**9, sink.check)
    assert reader.feed(b"From: a@x.example\r\n\r\n") == -1
    for _ in range(200):  # 12.8 MB with no line end
        assert reader.feed(b"y" * 65536) == -1
        assert reader.buffered <= LONG_LINE + 65536
    assert refused(reader, LINE_TOO_LONG) and not reader.endless
    assert reader.feed(b"\r\n.\r\nNOOP\r\n") == 5


def test_over_size_stops_writing() -> None:
    body = b"From: a@x.example\r\n\r\n" + b"z" * 70 + b"\r\n"
    stream = body * 100 + b".\r\n"
    reader, sink, used = read(stream, range(0, len(stream), 500), max_size=1000)
    assert used == len(stream)
    assert reader.error.code == 552 and reader.error.status == "5.3.4"
    assert len(sink.out) <= 1000


def test_size_refusal_wins_over_every_other() -> None:
    big = (b"z" * 70 + b"\r\n") * 1500
    for start, first in [
        (b"Subject: no from\r\n\r\n", Reply(550, "5.6.0", "Message has no From: header")),
        (b"From: a@x.example\r\n\r\nbare\nLF\r\n", None),
        (b"From: a@x.example\r\n\r\nNUL\0\r\n", None),
        (b"From: a@x.example\r\n\r\n" + b"w" * 70000 + b"\r\n", None),
    ]:
        stream = start + big + b".\r\n"
        for cuts in ([], range(0, len(stream), 1000)):
            reader, _, used = read(stream, cuts, max_size=100_000, sink=Sink(first))
            assert used == len(stream)
            assert (reader.error.code, reader.error.status) == (552, "5.3.4"), (start, cuts)
            # Under the limit, the other refusal stands.
            reader, _, _ = read(start + b".\r\n", cuts, max_size=100_000, sink=Sink(first))
            assert reader.error.code in (500, 550), start


def test_a_line_longer_than_the_size_limit_ends_the_search_for_the_end() -> None:
    sink = Sink()
    reader = DataReader(sink.write, 300_000, sink.check)
    reader.feed(b"From: a@x.example\r\n\r\n")
    for _ in range(4):
        assert reader.feed(b"y" * 65536) == -1
        assert not reader.endless
    reader.feed(b"y" * 65536)
    assert reader.endless
    assert (reader.error.code, reader.error.status) == (552, "5.3.4")
    # Long lines that end, however many, are another matter: the message just ends.
    reader = DataReader(sink.write, 300_000, sink.check)
    for _ in range(10):
        reader.feed(b"y" * 70000 + b"\r\n")
    assert not reader.endless and reader.feed(b".\r\n") == 3


def test_refusals_are_new_replies() -> None:
    # A Reply shared between sessions and raised by each gathers their tracebacks.
    one, two = (read(b"From: a@x.example\r\n\r\nx\ny\r\n.\r\n")[0] for _ in range(2))
    assert one.error is not two.error


def test_header_fields_are_added_at_the_end_of_the_header_section() -> None:
    added = b"From: env@x.example\r\n"
    for stream, expected in [
        (b"Subject: s\r\nTo: b@y.example\r\n\r\nbody\r\n.\r\n",
         b"Subject: s\r\nTo: b@y.example\r\n" + added + b"\r\nbody\r\n"),
        (b"\r\nbody\r\n.\r\n", added + b"\r\nbody\r\n"),
        (b"Subject: only a header\r\n.\r\n", b"Subject: only a header\r\n" + added),
    ]:
        for cut in range(1, len(stream)):
            reader, sink, _ = read(stream, [cut], sink=Sink(added))
            assert reader.error is None
            assert bytes(sink.out) == expected, (stream, cut)


def test_header_section_collected_across_chunks_and_checked_once() -> None:
    header = b"Subject: s\r\nFrom: a@x.example\r\n folded\r\nTo: b@y.example"
    stream = header + b"\r\n\r\nbody\r\n\r\nmore: not a header\r\n.\r\n"
    for cut in range(1, len(stream)):
        reader, sink, _ = read(stream, [cut])
        assert sink.headers == [header], cut
        assert bytes(sink.out) == stream[:-3]


def test_header_refusal_keeps_reading_to_the_end() -> None:
    sink = Sink(refuse_headers=Reply(*BARE_NEWLINE))
    reader, sink, used = read(b"From: x@evil.example\r\n\r\nbody\r\n.\r\nRSET\r\n", sink=sink)
    assert refused(reader, BARE_NEWLINE) and sink.out == b""
    assert used == len(b"From: x@evil.example\r\n\r\nbody\r\n.\r\n")


def test_header_only_message_is_checked_at_the_end() -> None:
    reader, sink, _ = read(b"From: a@x.example\r\nSubject: s\r\n.\r\n")
    assert sink.headers == [b"From: a@x.example\r\nSubject: s\r\n"]


def test_header_section_too_long() -> None:
    stream = b"From: a@x.example\r\n" + b"X-Pad: " + b"p" * 900 + b"\r\n"
    stream = stream * (MAX_HEADER // 900 + 10) + b"\r\nbody\r\n.\r\n"
    for cuts in (range(0, len(stream), 4096), ()):  # also when its end comes in one chunk
        reader, sink, used = read(stream, cuts)
        assert refused(reader, HEADER_TOO_LONG) and used == len(stream)
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
