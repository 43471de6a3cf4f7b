"""The footer on generated MIME trees: either left alone with a reason, or a valid message
whose body parts carry the footer and whose other parts are unchanged."""

from __future__ import annotations

import email
import random
from email.message import EmailMessage, MIMEPart
from email.policy import SMTP, default

import pytest

from mailrelay.features.footer import Footer

URL = "https://t.example/u/TOKEN"
MARK = "unsubscribe here"

CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "us-ascii"]
CTES = ["7bit", "8bit", "quoted-printable", "base64"]
ASCII = "abc xyz.,;<>&\"'=-\n\t=3D=\n"
ALPHABETS = {  # what each charset can hold
    "us-ascii": ASCII,
    "iso-8859-1": ASCII + "éàüß",
    "windows-1252": ASCII + "éàüß€œ",
    "utf-8": ASCII + "éàüß€œ→中文😀",
}


class Skip(Exception):
    """This combination cannot be built (e.g. text not encodable in the charset)."""


def random_text(rng: random.Random, charset: str, cte: str) -> str:
    alphabet = ASCII if cte == "7bit" else ALPHABETS[charset]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))


def random_spec(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if (depth == 0 and roll < 0.7) or (depth == 1 and roll < 0.35):
        subtype = rng.choice(["mixed", "alternative", "related"])
        return ("multi", subtype, [random_spec(rng, depth + 1) for _ in range(rng.randint(1, 4))])
    if roll < 0.85:
        charset, cte = rng.choice(CHARSETS), rng.choice(CTES)
        subtype, text = rng.choice(["plain", "html"]), random_text(rng, charset, cte)
        return ("text", subtype, text, charset, cte, rng.random() < 0.15)
    return ("binary", rng.randbytes(rng.randrange(0, 300)))


def build(spec, part: MIMEPart, depth: int = 0) -> None:
    kind = spec[0]
    if kind == "text":
        _, subtype, content, charset, cte, attached = spec
        if subtype == "html":
            content = f"<html><body>{content}</body></html>"
        try:
            content.encode(charset)
            part.set_content(content + "\n", subtype=subtype, charset=charset, cte=cte)
        except (UnicodeEncodeError, ValueError):
            raise Skip
        if attached:
            part["Content-Disposition"] = "attachment; filename=a.txt"
    elif kind == "binary":
        part.set_content(spec[1], maintype="application", subtype="octet-stream", filename="a.bin")
    else:
        part.set_type(f"multipart/{spec[1]}")
        part.set_boundary(f"==b{depth}.{id(part)}==")
        for child_spec in spec[2]:
            child = MIMEPart(policy=SMTP)
            build(child_spec, child, depth + 1)
            part.attach(child)


def make(spec) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "a@shop.example"
    msg["Subject"] = "s"
    build(spec, msg)
    return msg.as_bytes()


def leaves(msg):
    return [p for p in msg.walk() if not p.is_multipart()]


@pytest.mark.parametrize("seed", range(300))
def test_footer_on_generated_trees(seed):
    spec = random_spec(random.Random(seed))
    try:
        raw = make(spec)
    except Skip:
        return
    result = Footer().apply(raw, "alice@example.org", URL)
    if not result.changed:
        assert result.data is raw and result.reason
        return
    before = email.message_from_bytes(raw, policy=default)
    after = email.message_from_bytes(result.data, policy=default)
    for part in after.walk():
        assert not part.defects
    assert [p.get_content_type() for p in after.walk()] == [
        p.get_content_type() for p in before.walk()
    ]
    footed = 0
    for old, new in zip(leaves(before), leaves(after), strict=True):
        old_content, new_content = old.get_content(), new.get_content()
        if old_content == new_content:
            assert old.as_bytes() == new.as_bytes()
            continue
        assert old.get_content_type() in ("text/plain", "text/html") and not old.is_attachment()
        norm, old_norm = new_content.replace("\r\n", "\n"), old_content.replace("\r\n", "\n")
        kept = old_norm.split("</body>")[0] if old.get_content_subtype() == "html" else old_norm
        assert MARK in norm and norm.startswith(kept.rstrip("\n"))
        footed += 1
    assert footed >= 1
    assert after["List-Unsubscribe"] == f"<{URL}>"
