"""DKIM (RFC 6376): the key directory's format and the signature itself.

The directory (``[dkim] directory``, default ``<data_dir>/dkim``) holds one PEM file per
key, ``DOMAIN.SELECTOR.pem`` (mode 0600), and ``keys.json``, the index: a list of
``{domain, selector, type (rsa|ed25519), state, account, created, changed, dns_status,
dns_checked}``. The state
is ``pending`` (made by ``dkim rotate``, its record not yet seen in DNS: not used),
``active`` (signs) or ``retiring`` (replaced by a newer key at ``changed``: no longer
signs, its record stays published for a grace period until ``dkim retire``).
``account`` is the account whose authorized domain it was when the key was made: a
message is signed only for that account; ``null`` for a key of ``[dkim] relay_domain``,
which signs any account's mail that no key of its own signs. ``dns_status`` and
``dns_checked`` are the result (ok, missing, different, unknown) and time of the relay's
last scheduled look-up of the key's record (manage/dkimcheck.py). mailrelay-admin and the
relay write both (manage/dkim.py); the delivery process reads them (Signer) and sees a
change within a few seconds. With ``[cluster] postgres`` the same entries and keys are
rows of the database instead (postgres/dkim.py: PgSigner reads them when told of a change).

Signing: relaxed/relaxed, SHA-256, no ``l=``; From, To, Subject, Date, Message-ID,
MIME-Version and Content-Type are oversigned (each listed once more than it occurs, so
that none can be added after signing). The message is parsed once (its header fields
by dkimpy's ``rfc822_parse``, the body cut off unsplit) and canonicalised here with bytes
methods, which give dkimpy's result several times faster (its relaxed canonicalisation
runs regular expressions over every line; tests/test_dkim.py compares the two); the
private-key operation is made with ``cryptography`` (OpenSSL), fourteen times faster than
dkimpy's pure-Python RSA (bench/dkim_sign.py). An Ed25519 key adds a second signature
(ed25519-sha256, RFC 8463) over the same body hash. Blocking: call from a thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mailrelay.files import read_with_stat

INDEX = "keys.json"
TYPES = ("rsa", "ed25519")
SIGNED = (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
          b"content-type")
_ALGORITHM = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    type: str  # rsa | ed25519
    state: str  # pending | active | retiring
    account: str | None  # None: the relay domain's key, for every account
    created: float
    changed: float | None = None  # when the state last changed (None: since created)
    dns_status: str | None = None  # the relay's last scheduled look-up (None: not yet)
    dns_checked: float | None = None  # ... and when it was made

    @property
    def file_name(self) -> str:
        return f"{self.domain}.{self.selector}.pem"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, entry: dict) -> DkimKey:
        return cls(**{k: v for k, v in entry.items() if k in _FIELDS})


_FIELDS = frozenset(DkimKey.__dataclass_fields__)  # an entry with fields added later reads


def read_index(directory: str) -> tuple[list[DkimKey], object] | None:
    """The keys of the index and the stat it was read at; None when there is none."""
    got = read_with_stat(os.path.join(directory, INDEX))
    if got is None:
        return None
    data, stat = got
    return [DkimKey.from_json(entry) for entry in json.loads(data)], stat


def public_key_text(private) -> str:
    """The ``p=`` value: base64 of the SubjectPublicKeyInfo (RSA) or of the raw 32-byte
    key (Ed25519, RFC 8463)."""
    public = private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def header_domain(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The domain of the (single) address of the From: header; None when there is not
    exactly one From: with one address."""
    from email.utils import getaddresses

    values = [v for k, v in headers if k.lower() == b"from"]
    if len(values) != 1:
        return None
    addresses = getaddresses([values[0].decode("utf-8", "replace")])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return None
    return addresses[0][1].rpartition("@")[2].strip().lower().rstrip(".") or None


# The empty line that ends the header section: at the start, or right after a line end
# (a line may end in CRLF or a bare LF, as dkimpy's parser accepts).
_HEAD_END = re.compile(rb"(?:\A|\n)(\r?\n)")
_LINE_END = re.compile(rb"\r?\n")


def parse(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header fields (name, raw value with its folding and CRLF) and the body with
    every line ending made CRLF: what dkimpy's ``rfc822_parse`` gives, but the body is not
    split into lines and joined again (most of that function's time on a large body)."""
    end = _HEAD_END.search(message)
    if end is None:  # no body: every line is a header line
        head, body = message, b""
    else:
        head, body = message[:end.start(1)], message[end.end(1):]
    from dkim import rfc822_parse  # dkimpy and its DNS library: not for every CLI command

    headers = [(n, v) for n, v in rfc822_parse(head)[0]]
    if body.count(b"\n") != body.count(b"\r\n"):  # a bare LF somewhere
        body = _LINE_END.sub(b"\r\n", body)
    return headers, body


def _compress(data: bytes) -> bytes:
    """Every run of spaces and tabs made one space (RFC 6376 3.4.2 and 3.4.4)."""
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    # Each pass copies the whole body: long runs shrink by 64 and 8 at a time first, so
    # that a run of 100,000 spaces takes 7 passes, not 17; the usual body takes one.
    for run in (b" " * 64, b" " * 8, b"  "):
        while run in data:
            data = data.replace(run, b" ")
    return data


def relaxed_body(body: bytes) -> bytes:
    """The "relaxed" body canonicalisation (RFC 6376 3.4.4) of a body whose line ends are
    all CRLF (``parse``): runs of WSP made one space, WSP at the end of a line removed,
    empty lines at the end removed, CRLF added to a last line without one; an empty body
    stays empty."""
    body = _compress(body).replace(b" \r\n", b"\r\n")
    text = body.rstrip(b"\r\n")
    tail = body[len(text):]  # CRs and LFs, each LF after a CR
    if tail.endswith(b"\r\n"):
        # The empty lines are the CRLF pairs after the last CR that another CR follows
        # (a lone CR is part of its line's text).
        text += tail[:tail.rfind(b"\r\r") + 1]
    else:
        text += tail
    return text + b"\r\n" if text else b""


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """One field, "relaxed" (RFC 6376 3.4.2): the name in lower case, the value unfolded,
    runs of WSP made one space, WSP around it removed; ``name:value`` CRLF."""
    value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    # bytes.strip() also removes CR, VT and FF, as dkimpy does
    return name.lower().rstrip() + b":" + _compress(value).strip() + b"\r\n"


def body_hash(body: bytes) -> bytes:
    """The ``bh=`` value of a ``parse``d body: base64 of SHA-256 of its relaxed form."""
    return base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())


def signature(message: bytes, domain: str, selector: str, kind: str, private,
              now: float | None = None) -> bytes:
    """The ``DKIM-Signature:`` header field (CRLF-terminated) for ``message``."""
    headers, body = parse(message)
    return sign_parsed(headers, body_hash(body), domain, selector, kind, private, now)


def sign_parsed(headers: list[tuple[bytes, bytes]], bodyhash: bytes, domain: str,
                selector: str, kind: str, private, now: float | None = None) -> bytes:
    """``signature`` of a message already ``parse``d, its body hashed (``body_hash``)."""
    names = [n.lower() for n, _ in headers]
    signed = [h for h in SIGNED for _ in range(names.count(h) + 1)]
    value = (b"v=1; a=" + _ALGORITHM[kind] + b"; c=relaxed/relaxed; d=" + domain.encode("ascii")
             + b"; s=" + selector.encode("ascii") + b";\r\n t="
             + str(int(time.time() if now is None else now)).encode("ascii")
             + b"; bh=" + bodyhash + b";\r\n h=" + b":".join(signed) + b";\r\n b=")
    # What is signed: the chosen fields canonicalised (each name in h= takes the last
    # field of that name not taken yet, RFC 6376 5.4.2), then this field with b= empty and
    # no trailing CRLF (3.7).
    chosen, last = [], {}
    for h in signed:
        i = last.get(h, len(headers))
        while i > 0:
            i -= 1
            if names[i] == h:
                chosen.append(relaxed_header(*headers[i]))
                break
        last[h] = i
    own = relaxed_header(b"DKIM-Signature", b" " + value)
    data = b"".join(chosen) + own[:-2]
    if kind == "rsa":
        sig = private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:  # RFC 8463: Ed25519 over the SHA-256 of the same data
        sig = private.sign(hashlib.sha256(data).digest())
    value += base64.b64encode(sig)
    return b"DKIM-Signature: " + value + b"\r\n"


class Signer:
    """The delivery process's view of the key directory: active keys by domain, re-read
    when the index changes (``refresh``, at most every ``every`` seconds).

    ``relay_domain`` (``[dkim] relay_domain``): a message that no key of its account signs
    (its From: domain has none, or another account's) is signed by that domain's keys,
    which belong to no account; so is the relay's own mail (bounces, notices)."""

    def __init__(self, directory: str, clock=time, every: float = 2.0,
                 relay_domain: str = "") -> None:  # fmt: skip
        self.directory = directory
        self.clock = clock
        self.every = every
        self.relay_domain = relay_domain
        self._checked = float("-inf")
        self._stat: object = None
        self._accounts: frozenset[str | None] = frozenset()
        self._keys: dict[str, list[tuple[DkimKey, object]]] = {}  # domain -> keys

    def due(self) -> bool:
        """True when the index should be looked at again (call refresh in a thread)."""
        return self.clock.time() - self._checked >= self.every

    def refresh(self) -> None:
        """Re-read the index and keys if the index changed (blocking)."""
        self._checked = self.clock.time()
        got = read_index(self.directory)
        stat = got and got[1]
        if stat == self._stat:
            return

        def pem(key: DkimKey) -> bytes:
            with open(os.path.join(self.directory, key.file_name), "rb") as f:
                return f.read()

        self._use(got[0] if got else [], pem)
        self._stat = stat

    def _use(self, found: list[DkimKey], pem) -> None:
        """Sign with the active keys of ``found`` from now on, each read with ``pem(key)``."""
        keys: dict[str, list[tuple[DkimKey, object]]] = {}
        for key in found:
            # A key of no account signs only as the configured relay domain's.
            if key.state != "active" or key.account is None and key.domain != self.relay_domain:
                continue
            private = serialization.load_pem_private_key(pem(key), None)
            keys.setdefault(key.domain, []).append((key, private))
        for entries in keys.values():  # RSA first: the signature every verifier knows
            entries.sort(key=lambda e: (TYPES.index(e[0].type), -e[0].created))
        self._keys = keys
        self._accounts = frozenset(k.account for e in keys.values() for k, _ in e)

    def signs_for(self, account: str | None) -> bool:
        """False when no mail of ``account`` can be signed (no thread needed)."""
        return None in self._accounts or account is not None and account in self._accounts

    def sign(self, message: bytes, account: str | None) -> bytes:
        """The DKIM-Signature fields to put on top of ``message`` (b"" when none): by the
        newest key of each type of its From: domain made for ``account``, else by the
        relay domain's."""
        headers, body = parse(message)  # once for every signature
        bodyhash: list[bytes] = []  # ... and the body hashed once, when a key signs
        domain = header_domain(headers)
        own = self._signatures(headers, body, bodyhash, domain or "", account)
        if own or not self.relay_domain:
            return own
        return self._signatures(headers, body, bodyhash, self.relay_domain, None)

    def _signatures(self, headers: list[tuple[bytes, bytes]], body: bytes,
                    bodyhash: list[bytes], domain: str, account: str | None) -> bytes:
        out, seen = [], set()
        for key, private in self._keys.get(domain, []):
            if key.account in (account, None) and key.type not in seen:
                seen.add(key.type)
                if not bodyhash:
                    bodyhash.append(body_hash(body))
                out.append(sign_parsed(headers, bodyhash[0], key.domain, key.selector,
                                       key.type, private))
        return b"".join(out)  # the RSA signature topmost


def new_private_key(kind: str, bits: int = 2048):
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)
