"""Messages with lines over 998 octets made to conform: every line short enough afterwards,
each part's decoded content unchanged, nothing that could pass for a MIME boundary."""

from __future__ import annotations

import base64
import io
import random
from email import message_from_bytes
from email.policy import compat32

import pytest

from mailrelay.reply import Reply
from mailrelay.smtp.longlines import conform

LONG_HTML = ("<p>" + "Grüße aus dem Newsletter, " * 300 + "</p>").encode()  # one 8,000 line


def convert(raw: bytes) -> bytes:
    out = bytearray()
    conform(io.BytesIO(raw), out.extend)
    return bytes(out)


def lines_fit(raw: bytes) -> bool:
    return raw.endswith(b"\r\n") and all(len(x) <= 998 for x in raw.split(b"\r\n"))


def leaves(raw: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded content) of each leaf part, as a mail reader gets them."""
    msg = message_from_bytes(raw, policy=compat32)
    return [(p.get_content_type(), p.get_payload(decode=True))
            for p in msg.walk() if not p.is_multipart()]


def test_single_part_without_mime_becomes_quoted_printable() -> None:
    body = b"short line\r\n" + LONG_HTML + b" \r\n=equals and .dot\r\n-dash\r\n\r\nend\r\n"
    raw = b"Received: by relay\r\nFrom: a@doe.test\r\nSubject: s\r\n\r\n" + body
    out = convert(raw)
    assert lines_fit(out)
    head, _, encoded = out.partition(b"\r\n\r\n")
    assert head == (b"Received: by relay\r\nFrom: a@doe.test\r\nSubject: s\r\n"
                    b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable")
    assert all(len(x) <= 76 for x in encoded.split(b"\r\n"))
    assert leaves(out) == [("text/plain", body)]


def test_only_the_part_with_a_long_line_changes() -> None:
    plain = b"Hello,\r\nthe plain part.\r\n"
    attachment = base64.encodebytes(bytes(range(256)) * 8).replace(b"\n", b"\r\n")
    raw = (b"From: a@doe.test\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\npreamble\r\n'
           b'--outer\r\nContent-Type: multipart/alternative; boundary="inner"\r\n\r\n'
           b"--inner\r\nContent-Type: text/plain\r\n\r\n" + plain +
           b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n" + LONG_HTML + b"\r\n"
           b"--inner--\r\n"
           b"--outer\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + attachment +
           b"--outer--\r\nepilogue\r\n")
    out = convert(raw)
    assert lines_fit(out)
    assert leaves(out) == leaves(raw)
    html_start = raw.index(b"--inner\r\nContent-Type: text/html")
    html_end = raw.index(b"--inner--")
    assert out.startswith(raw[:html_start])  # everything before it as it was
    assert out.endswith(raw[html_end:])  # and everything after
    assert (b"Content-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n") in out
    assert b"8bit" not in out


def test_long_quoted_printable_and_base64_lines_are_folded_in_place() -> None:
    qp = ("caf\u00e9 " * 400).encode("latin-1").replace(b"\xe9", b"=E9") + b"=\r\n"
    qp = qp + b"next\r\n"
    data = bytes(random.Random(5).randrange(256) for _ in range(3000))
    b64 = base64.b64encode(data) + b"\r\n"
    raw = (b"From: a@doe.test\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
           b"--b\r\nContent-Type: text/plain; charset=latin-1\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp +
           b"--b\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--b--\r\n")
    out = convert(raw)
    assert lines_fit(out)
    assert leaves(out) == leaves(raw)
    assert leaves(out)[1][1] == data
    assert out.count(b"quoted-printable") == 1 and out.count(b"base64") == 1
    # Never cut inside an =XX escape.
    assert all(not x.endswith((b"=E", b"=")) or x.endswith(b"=") and not x.endswith(b"==")
               for x in out.split(b"\r\n"))


def test_long_header_lines_are_folded_and_unfold_to_what_was_sent() -> None:
    to = ", ".join(f"person{i}@example.net" for i in range(200))
    raw = f"From: a@doe.test\r\nTo: {to}\r\nSubject: s\r\n\r\nbody\r\n".encode()
    out = convert(raw)
    assert lines_fit(out)
    header = out.split(b"\r\n\r\n")[0]
    assert header.replace(b"\r\n ", b" ").split(b"\r\n")[1] == f"To: {to}".encode()
    assert out.endswith(b"\r\n\r\nbody\r\n")
    assert "Content-Transfer-Encoding" not in out.decode()
    with pytest.raises(Reply) as e:
        convert(b"From: a@doe.test\r\nX-Token: " + b"t" * 2000 + b"\r\n\r\nbody\r\n")
    assert (e.value.code, e.value.status) == (550, "5.6.3")
    assert "no space to fold" in e.value.text


def test_signed_content_is_refused_not_broken() -> None:
    raw = (b"From: a@doe.test\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/signed; boundary="s"; protocol="application/pgp-signature"'
           b"\r\n\r\n--s\r\nContent-Type: text/html\r\n\r\n" + LONG_HTML + b"\r\n"
           b"--s\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n")
    with pytest.raises(Reply) as e:
        convert(raw)
    assert (e.value.code, e.value.status) == (550, "5.6.3")
    assert "signed" in e.value.text
    # A long line in the signature part's base64 only needs folding: allowed.
    signature = base64.b64encode(bytes(1000)) + b"\r\n"
    raw = raw.replace(LONG_HTML, b"<p>short</p>").replace(
        b"application/pgp-signature\r\n\r\nsig", b"application/pkcs7-signature\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + signature[:-2])
    out = convert(raw)
    assert lines_fit(out) and leaves(out) == leaves(raw)


def test_no_new_line_can_pass_for_a_boundary() -> None:
    # Long lines made of boundary-like text: wherever they are cut, no new line may start
    # with "--", so the structure a reader sees stays the same.
    rng = random.Random(7)
    boundary = b"=_b"
    for _ in range(200):
        filler = b"x" + b"".join(rng.choice([b"-", b"--=_b", b"--=_b--", b"x", b"=", b" "])
                                 for _ in range(rng.randint(400, 900)))
        cte = rng.choice([b"7bit", b"quoted-printable", b"base64"])
        # Valid quoted-printable has "=" only in escapes ("=3D"), which the cuts must keep.
        content = filler.replace(b"=", b"=3D") if cte == b"quoted-printable" else filler
        raw = (b"From: a@doe.test\r\nMIME-Version: 1.0\r\n"
               b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
               b"pre" + filler + b"\r\n--" + boundary + b"\r\n"
               b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + content + b"\r\n"
               b"--" + boundary + b"\r\n\r\nlast\r\n--" + boundary + b"--\r\n" + filler
               + b"\r\n")
        out = convert(raw)
        assert lines_fit(out)
        assert [x for x in out.split(b"\r\n") if x.startswith(b"--")] == [
            b"--=_b", b"--=_b", b"--=_b--"]
        if cte != b"base64":  # a base64 decoder skips the filler's stray characters
            assert leaves(out) == leaves(raw)
