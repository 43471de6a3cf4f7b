"""Real-world message shapes for the footer and tracking tests, in spool form (CRLF)."""

from __future__ import annotations

import base64
from email.message import EmailMessage
from email.policy import SMTP

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
HEADERS = (
    "Received: from client.example (client.example [192.0.2.1])\r\n"
    "\tby relay.example with ESMTPSA id 30193a2b4c5d6e7f8a9b\r\n"
    "From: Shop <news@shop.example>\r\n"
    "To: alice@example.org\r\n"
    "Subject: =?utf-8?q?Caf=C3=A9_news?=\r\n"
    "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    "Message-ID: <1@shop.example>\r\n"
    "MIME-Version: 1.0\r\n"
)


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("latin-1")


def _message() -> EmailMessage:
    m = EmailMessage(policy=SMTP)
    m["From"] = "Shop <news@shop.example>"
    m["To"] = "alice@example.org"
    m["Subject"] = "Café news"
    m["Message-ID"] = "<1@shop.example>"
    return m


def plain() -> bytes:
    return crlf(HEADERS + "Content-Type: text/plain; charset=us-ascii\n\nHello Alice,\nnews.\n")


def html_only() -> bytes:
    return crlf(
        HEADERS + "Content-Type: text/html; charset=utf-8\n\n"
        '<html><body><p>Hello <a href="https://shop.example/a?x=1&amp;y=2">sale</a></p>'
        "</body></html>\n"
    )


def alternative() -> bytes:
    m = _message()
    m.set_content("Hello Alice,\nthe café is open.\n")
    m.add_alternative(
        "<html><body><p>Hello, the caf\u00e9 is <a href='http://shop.example/open'>open</a>"
        "</p></body></html>\n",
        subtype="html",
    )
    return m.as_bytes()


def mixed_with_attachments() -> bytes:
    m = _message()
    m.set_content("See the attached files.\n")
    m.add_alternative("<html><body><p>See the attached files.</p></body></html>\n", "html")
    m.add_attachment(PDF, maintype="application", subtype="pdf", filename="price list.pdf")
    m.add_attachment("notes, not body\n", filename="notes.txt")
    return m.as_bytes()


def nested() -> bytes:
    """mixed[alternative[plain, related[html, image]], pdf]"""
    m = _message()
    m.set_content("Nested plain.\n")
    m.add_alternative(
        '<html><body><img src="cid:logo@shop"><a href="https://shop.example/">x</a>'
        "</body></html>\n",
        subtype="html",
    )
    html_part = m.get_payload()[1]
    html_part.add_related(b"\x89PNG\r\n\x1a\nfake", "image", "png", cid="<logo@shop>")
    m.add_attachment(PDF, maintype="application", subtype="pdf", filename="a.pdf")
    return m.as_bytes()


def latin1(charset: str = "iso-8859-1", cte: str = "8bit") -> bytes:
    body = "Bonjour, le café est ouvert.\n".encode(charset)
    if cte == "quoted-printable":
        import quopri

        body = quopri.encodestring(body)
    elif cte == "base64":
        body = base64.encodebytes(body)
    return crlf(
        HEADERS + f"Content-Type: text/plain; charset={charset}\n"
        f"Content-Transfer-Encoding: {cte}\n\n" + body.decode("latin-1")
    )


def qp_html() -> bytes:
    m = _message()
    m.set_content("Plain.\n", cte="quoted-printable")
    m.add_alternative(
        "<html><body><p>" + "Caf\u00e9 " * 30 + "</p></body></html>\n",
        subtype="html",
        cte="quoted-printable",
    )
    return m.as_bytes()


def base64_parts() -> bytes:
    m = _message()
    m.set_content("Plain in base64, café.\n", cte="base64")
    m.add_alternative("<html><body>HTML in base64</body></html>\n", "html", cte="base64")
    return m.as_bytes()


def forwarded() -> bytes:
    """A message attached as message/rfc822 after the body."""
    m = _message()
    m.set_content("Forwarding this.\n")
    inner = _message()
    inner.set_content("<html><body>inner</body></html>\n", subtype="html")
    m.add_attachment(inner)
    return m.as_bytes()


def smime_signed() -> bytes:
    return crlf(
        HEADERS + 'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\n'
        ' micalg=sha-256; boundary="sig"\n\n'
        "--sig\nContent-Type: text/plain\n\nSigned text.\n"
        "--sig\nContent-Type: application/pkcs7-signature; name=smime.p7s\n"
        "Content-Transfer-Encoding: base64\n\nMIIBAAAA\n--sig--\n"
    )


def smime_enveloped() -> bytes:
    return crlf(
        HEADERS + "Content-Type: application/pkcs7-mime; smime-type=enveloped-data;"
        " name=smime.p7m\nContent-Transfer-Encoding: base64\n\nMIIBAAAA\n"
    )


def pgp_encrypted() -> bytes:
    return crlf(
        HEADERS + 'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
        ' boundary="enc"\n\n--enc\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n'
        "--enc\nContent-Type: application/octet-stream\n\n-----BEGIN PGP MESSAGE-----\nx\n"
        "-----END PGP MESSAGE-----\n--enc--\n"
    )


def inline_pgp() -> bytes:
    return crlf(
        HEADERS + "Content-Type: text/plain\n\n-----BEGIN PGP SIGNED MESSAGE-----\n"
        "Hash: SHA256\n\nhello\n-----BEGIN PGP SIGNATURE-----\nx\n-----END PGP SIGNATURE-----\n"
    )


def unclosed_multipart() -> bytes:
    return crlf(
        HEADERS + 'Content-Type: multipart/mixed; boundary="b"\n\n'
        "--b\nContent-Type: text/plain\n\nno closing boundary\n"
    )
