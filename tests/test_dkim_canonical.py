"""The signature's own parsing and relaxed canonicalisation (mailrelay/dkim.py) against
dkimpy's, which it replaced for speed: the same header fields, body, canonical forms and
signature, byte for byte, on the MIME samples, on bodies chosen for the rules' edge cases
and on random messages; and the comparison tells a wrong canonicaliser."""

from __future__ import annotations

import base64
import hashlib
import random
import time

import dkim
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from dkim import rfc822_parse, select_headers
from dkim.canonicalization import CanonicalizationPolicy

from mailrelay.dkim import (
    SIGNED,
    new_private_key,
    parse,
    public_key_text,
    relaxed_body,
    relaxed_header,
    signature,
)
from tests import mime_samples

RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
HEAD = (b"From: News <news@example.com>\r\nTo: a@example.org\r\nSubject: hi\r\n"
        b"Date: Sun, 06 Dec 2026 08:00:00 +0000\r\n\r\n")  # fmt: skip
BODIES = [
    b"", b"\r\n", b"\r\n\r\n\r\n", b"no final line end", b"x\r\n", b"x\r\n\r\n\r\n",
    b"trailing  \t \r\nspace\t\r\n \r\n\t\r\n", b"  lead and\t\tinner   runs  \r\n",
    b"bare\nline\nfeeds\n\n", b"mixed\r\nends\n\r\n\n", b"lone\rcr\r\r\n\r", b"\r",
    b"x\r\r\n\r\n", b"x \r \r\n", b" ", b"\t", b"\r\n \r\n\t\r\n", b"a\r\n\r\n b\r\n\r\n",
    b"long " * 20000 + b"\r\n", b"a" * 5000 + b"  \r\n" * 3,
    "8-bit: f\xfcr \xe9t\xe9 \u00a0nbsp \u2003em\r\n".encode("utf-8"),
    bytes(range(256)) + b"\r\n", b" " * 1000 + b"\r\n" + b"\t" * 999,
]
MESSAGES = (
    [HEAD + b for b in BODIES]
    + [getattr(mime_samples, n)() for n in dir(mime_samples)
       if callable(getattr(mime_samples, n)) and n not in ("crlf", "_message")
       and getattr(mime_samples, n).__module__ == mime_samples.__name__]
    + [b"From: a@example.com\r\nSubject: no body", b"From: a@example.com\r\n",
       b"\r\nbody only", b"From: a@example.com\nX:  folded\n\t value \t\n\nLF\nonly\n",
       b"From a@example.com Sun Dec  6 2026\r\nFrom:a@example.com\r\nTo:\r\n\r\nx",
       b"FROM: a@Example.COM \r\nsubject:\t spaced \t \r\n  folded\r\nSubject: two\r\n"
       b"X-Odd:\x0b va\x0blue\x0c\r\n\r\nx"]
)


def random_message(rng: random.Random) -> bytes:
    head = b"From: a@example.com\r\n" + b"".join(
        rng.choice([b"Subject:", b"To: ", b"X-A:", b"Date:\t"])
        + bytes(rng.choice(b"ab \t\r\n") for _ in range(rng.randrange(6))) + b"x\r\n"
        for _ in range(rng.randrange(4)))
    return head + rng.choice([b"\r\n", b"\n"]) + bytes(
        rng.choice(b"ab \t\r\n\xe9") for _ in range(rng.randrange(40)))


RANDOM = [random_message(random.Random(seed)) for seed in range(3000)]


def dkimpy_signature(message: bytes, kind: str, private, now: float) -> bytes:
    """The signature as it was made with dkimpy's parsing and canonicalisation."""
    headers, body = rfc822_parse(message)
    bodyhash = base64.b64encode(hashlib.sha256(RELAXED.canonicalize_body(body)).digest())
    names = [n.lower() for n, _ in headers]
    signed = [h for h in SIGNED for _ in range(names.count(h) + 1)]
    value = (b"v=1; a=" + (b"rsa-sha256" if kind == "rsa" else b"ed25519-sha256")
             + b"; c=relaxed/relaxed; d=example.com; s=s1;\r\n t=" + str(int(now)).encode()
             + b"; bh=" + bodyhash + b";\r\n h=" + b":".join(signed) + b";\r\n b=")
    chosen = select_headers(RELAXED.canonicalize_headers(headers), signed)
    ((_, own),) = RELAXED.canonicalize_headers([(b"DKIM-Signature", b" " + value)])
    data = b"".join(n + b":" + v for n, v in chosen) + b"dkim-signature:" + own.rstrip()
    if kind == "rsa":
        sig = private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = private.sign(hashlib.sha256(data).digest())
    return b"DKIM-Signature: " + value + base64.b64encode(sig) + b"\r\n"


def differences(canonical_body, canonical_header, messages) -> list[bytes]:
    """The messages where parsing or either canonicalisation differs from dkimpy's."""
    out = []
    for message in messages:
        try:
            theirs = rfc822_parse(message)
        except dkim.MessageFormatError:  # refused: by both
            with pytest.raises(dkim.MessageFormatError):
                parse(message)
            continue
        headers, body = parse(message)
        if ([list(h) for h in headers], body) != (theirs[0], theirs[1]) \
                or canonical_body(body) != RELAXED.canonicalize_body(theirs[1]) \
                or [canonical_header(n, v) for n, v in headers] \
                != [n + b":" + v for n, v in RELAXED.canonicalize_headers(theirs[0])]:
            out.append(message)
    return out


def test_parsing_and_canonical_forms_are_dkimpys():
    assert differences(relaxed_body, relaxed_header, MESSAGES + RANDOM) == []


def test_a_wrong_canonicaliser_is_told():
    """Each of these small faults makes the comparison above fail."""
    mutants = [
        lambda b: relaxed_body(b).replace(b"\r\n\r\n", b"\r\n"),  # inner empty lines
        lambda b: relaxed_body(b.replace(b"\t", b"")),  # tabs dropped, not made spaces
        lambda b: relaxed_body(b) if b else b"\r\n",  # empty body given a line
        lambda b: relaxed_body(b).rstrip(b"\r\n") + b"\r\n" if b.strip() else b"",  # lone CRs
        lambda b: relaxed_body(b.rstrip(b" \t")),  # last line without CRLF loses its WSP
        lambda b: relaxed_body(b).replace(b"\r\n ", b"\r\n"),  # WSP at a line's start
    ]
    for mutant in mutants:
        assert differences(mutant, relaxed_header, MESSAGES)
    header_mutants = [
        lambda n, v: relaxed_header(n, v.replace(b"\t", b" ")),  # fine: the same result
        lambda n, v: n + relaxed_header(n, v)[len(n):],  # name not in lower case
        lambda n, v: n.lower() + b":" + b" ".join(v.split()) + b"\r\n",  # VT/FF inside
        lambda n, v: relaxed_header(n, v.replace(b"\x0b", b" ")),  # VT taken for WSP
    ]
    assert not differences(relaxed_body, header_mutants[0], MESSAGES)
    for mutant in header_mutants[1:]:
        assert differences(relaxed_body, mutant, MESSAGES)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signature_is_the_one_made_with_dkimpy(kind):
    private = new_private_key(kind, 1024)
    record = f"v=DKIM1; k={kind}; p={public_key_text(private)}".encode()
    now = time.time()
    for message in MESSAGES + RANDOM[:300]:
        try:
            rfc822_parse(message)
        except dkim.MessageFormatError:
            continue
        ours = signature(message, "example.com", "s1", kind, private, now)
        assert ours == dkimpy_signature(message, kind, private, now), message
        if kind == "rsa":  # dkimpy verifies Ed25519 only with PyNaCl
            assert dkim.verify(ours + message, dnsfunc=lambda _n, timeout=5: record), message
