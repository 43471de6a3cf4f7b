"""The unsubscribe footer on real-world MIME shapes, parsed back with the email package."""

from __future__ import annotations

import email
from email.policy import default

import mime_samples as s
import pytest

from mailrelay.features.footer import Footer
from mailrelay.features.mime import prepare

URL = "https://track.example/u/TOKEN123"
MAILTO = "mailto:unsub@relay.example?subject=unsubscribe%20TOKEN123"
RCPT = "alice@example.org"
TEXT_MARK = f"unsubscribe here: {URL}"
HTML_MARK = f'<a href="{URL}">unsubscribe here</a>'


def apply(raw: bytes, footer: Footer | None = None, mailto: str | None = MAILTO) -> bytes:
    result = (footer or Footer()).apply(raw, RCPT, URL, mailto)
    assert result.changed, result.reason
    return result.data


def parse(data: bytes):
    msg = email.message_from_bytes(data, policy=default)
    for part in msg.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    return msg


def bodies(msg) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"plain": [], "html": []}
    for part in msg.walk():
        if part.get_content_type() in ("text/plain", "text/html") and not part.is_attachment():
            out[part.get_content_subtype()].append(part.get_content().replace("\r\n", "\n"))
    return out


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def chunks(data: bytes, boundary: str) -> list[bytes]:
    return data.split(b"\r\n--" + boundary.encode())


def test_plain_only():
    raw = s.plain()
    out = apply(raw)
    msg = parse(out)
    (text,) = bodies(msg)["plain"]
    footer = f"To stop receiving these messages at {RCPT}, {TEXT_MARK}"
    assert text == f"Hello Alice,\nnews.\n\n{footer}\n"
    assert msg.get_content_charset() == "us-ascii"
    # Headers round-trip byte for byte; the list headers are appended to them.
    assert (
        header_block(out)
        == header_block(raw)
        + (
            f"List-Unsubscribe: <{URL}>,\r\n <{MAILTO}>\r\n"
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ).encode()
    )
    assert msg["List-Unsubscribe"] == f"<{URL}>, <{MAILTO}>"


def test_without_mailto_only_the_https_uri():
    msg = parse(apply(s.plain(), mailto=None))
    assert msg["List-Unsubscribe"] == f"<{URL}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_existing_list_unsubscribe_is_replaced():
    raw = s.plain().replace(
        b"MIME-Version", b"List-Unsubscribe: <https://app.example/x>\r\nMIME-Version", 1
    )
    msg = parse(apply(raw, mailto=None))
    assert msg.get_all("List-Unsubscribe") == [f"<{URL}>"]


def test_html_only():
    out = apply(s.html_only())
    (html,) = bodies(parse(out))["html"]
    assert html.index(HTML_MARK) < html.index("</body>")
    assert not bodies(parse(out))["plain"]


def test_html_without_body_tag_gets_footer_appended():
    raw = s.html_only().replace(b"</body></html>", b"")
    (html,) = bodies(parse(apply(raw)))["html"]
    assert html.rstrip().endswith("unsubscribe here</a>.</p>")


def test_alternative_both_parts():
    msg = parse(apply(s.alternative()))
    assert msg.get_content_type() == "multipart/alternative"
    found = bodies(msg)
    assert TEXT_MARK in found["plain"][0] and "café is open" in found["plain"][0]
    assert HTML_MARK in found["html"][0] and "café" in found["html"][0]


def test_mixed_attachments_untouched():
    raw = s.mixed_with_attachments()
    out = apply(raw)
    msg = parse(out)
    found = bodies(msg)
    assert TEXT_MARK in found["plain"][0] and HTML_MARK in found["html"][0]
    pdf, notes = list(msg.iter_attachments())
    assert pdf.get_content() == s.PDF
    # A text attachment gets no footer.
    assert notes.get_content().replace("\r\n", "\n") == "notes, not body\n"
    boundary = email.message_from_bytes(raw).get_boundary()
    before, after = chunks(raw, boundary), chunks(out, boundary)
    assert len(before) == len(after) == 5  # preamble, alternative, pdf, notes, close
    # Headers (and the empty preamble) as they were, the list headers appended.
    assert after[0].startswith(before[0]) and after[0].endswith(b"One-Click\r\n")
    assert after[2:] == before[2:]  # attachments and epilogue byte-identical


def test_nested_multiparts():
    raw = s.nested()
    msg = parse(apply(raw))
    types = [p.get_content_type() for p in msg.walk()]
    assert types == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "application/pdf",
    ]
    found = bodies(msg)
    assert TEXT_MARK in found["plain"][0] and HTML_MARK in found["html"][0]
    image = next(p for p in msg.walk() if p.get_content_type() == "image/png")
    assert image.get_content() == b"\x89PNG\r\n\x1a\nfake"


@pytest.mark.parametrize("cte", ["8bit", "quoted-printable", "base64"])
@pytest.mark.parametrize("charset", ["iso-8859-1", "windows-1252"])
def test_charset_kept_when_footer_fits(charset, cte):
    msg = parse(apply(s.latin1(charset, cte)))
    assert msg.get_content_charset() == charset
    assert msg["Content-Transfer-Encoding"] == cte
    (text,) = bodies(msg)["plain"]
    assert text.startswith("Bonjour, le café est ouvert.\n\n") and TEXT_MARK in text


@pytest.mark.parametrize("charset", ["iso-8859-1", "us-ascii"])
def test_part_becomes_utf8_when_footer_does_not_fit(charset):
    footer = Footer(text_template="Désinscription → $url")
    raw = s.latin1(charset, "8bit") if charset != "us-ascii" else s.plain()
    msg = parse(apply(raw, footer))
    assert msg.get_content_charset() == "utf-8"
    (text,) = bodies(msg)["plain"]
    assert f"Désinscription → {URL}" in text
    if charset == "us-ascii":  # was 7bit: 8-bit text needs quoted-printable now
        assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    else:
        assert "café" in text


def test_windows_1252_holds_the_euro_sign():
    footer = Footer(text_template="€ $url")
    msg = parse(apply(s.latin1("windows-1252"), footer))
    assert msg.get_content_charset() == "windows-1252"
    assert f"€ {URL}" in bodies(msg)["plain"][0]


def test_html_keeps_its_charset_with_character_references():
    footer = Footer(html_template='<p>→ <a href="$url">x</a></p>')
    raw = s.html_only().replace(b"charset=utf-8", b"charset=us-ascii")
    msg = parse(apply(raw, footer))
    assert msg.get_content_charset() == "us-ascii"
    assert "<p>&#8594; <a href" in bodies(msg)["html"][0]


def test_quoted_printable_and_base64_parts():
    for raw, cte in ((s.qp_html(), "quoted-printable"), (s.base64_parts(), "base64")):
        msg = parse(apply(raw))
        for part in msg.walk():
            if part.get_content_maintype() == "text":
                assert part["Content-Transfer-Encoding"] == cte
        found = bodies(msg)
        assert TEXT_MARK in found["plain"][0] and HTML_MARK in found["html"][0]


def test_forwarded_message_untouched():
    raw = s.forwarded()
    msg = parse(apply(raw))
    assert TEXT_MARK in bodies(msg)["plain"][0]
    inner = next(msg.iter_attachments())
    assert inner.get_content_type() == "message/rfc822"
    assert "unsubscribe" not in inner.as_string()


def test_recipient_is_escaped_in_html():
    result = Footer().apply(s.html_only(), '"<b>"@example.org', URL)
    assert "&quot;&lt;b&gt;&quot;@example.org" in bodies(parse(result.data))["html"][0]


@pytest.mark.parametrize(
    "sample, reason",
    [
        (s.smime_signed, "signed or encrypted (multipart/signed)"),
        (s.smime_enveloped, "signed or encrypted (application/pkcs7-mime)"),
        (s.pgp_encrypted, "signed or encrypted (multipart/encrypted)"),
        (s.inline_pgp, "inline PGP"),
        (s.unclosed_multipart, "multipart without its closing boundary"),
    ],
)
def test_unsafe_messages_are_returned_unchanged(sample, reason):
    raw = sample()
    result = Footer().apply(raw, RCPT, URL)
    assert not result.changed
    assert result.data is raw
    assert result.reason == reason


def test_other_refusals():
    attachment_only = s.crlf(
        s.HEADERS + "Content-Type: text/plain\nContent-Disposition: attachment; filename=a.txt"
        "\n\ndata\n"
    )
    report = s.crlf(
        s.HEADERS + 'Content-Type: multipart/report; report-type=delivery-status; boundary="r"'
        "\n\n--r\nContent-Type: text/plain\n\nbounce\n--r--\n"
    )
    bare_lf = s.plain().replace(b"news.\r\n", b"news.\n")
    latin_undeclared = s.plain().replace(b"news.", b"caf\xe9")
    cases = {
        attachment_only: "no text or HTML body part",
        report: "unknown structure (multipart/report)",
        bare_lf: "bare CR or LF in the message",
        latin_undeclared: "text/plain part is not valid us-ascii",
    }
    for raw, reason in cases.items():
        result = Footer().apply(raw, RCPT, URL)
        assert (result.changed, result.reason) == (False, reason)


def test_templates_are_checked():
    with pytest.raises(ValueError, match=r"unknown placeholder \$name in the text"):
        Footer(text_template="Hi $name")
    with pytest.raises(ValueError, match="bad HTML footer template"):
        Footer(html_template="costs 5$")
    assert "$5" in Footer(text_template="costs $$5 $url").edit(RCPT, URL)(
        prepare(s.plain()).parts[0]
    )
