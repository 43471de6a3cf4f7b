"""Verify a ``userPassword`` value read from LDAP (password_mode = compare).

Values are RFC 3112 style ``{SCHEME}data``, as slappasswd and OpenLDAP write them:
{SSHA}, {SHA}, {SSHA256}/{SHA256}, {SSHA384}/{SHA384}, {SSHA512}/{SHA512} (pw-sha2),
{CRYPT} (the system crypt(3)) and {ARGON2} (argon2-cffi). Anything else, cleartext
included, is refused. Hashing is slow on purpose: call these from a thread, not the reactor.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import warnings

import argon2

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import crypt  # deprecated since 3.11, gone in 3.13: {CRYPT} is then unsupported
    except ImportError:
        crypt = None

_SCHEME_RE = re.compile(rb"^\{([A-Za-z0-9.-]+)\}(.*)$", re.DOTALL)
_DIGESTS = {"SHA": "sha1", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
_argon2 = argon2.PasswordHasher()


class UnsupportedScheme(ValueError):
    """No value could be checked because its scheme is unknown here (the text names it)."""


def verify_any(password: str, stored: list[bytes]) -> bool:
    """True when ``password`` matches one of the userPassword values ``stored``.

    Raises UnsupportedScheme when nothing matched and some value had a scheme this module
    cannot check, so the admin learns why a correct password is refused.
    """
    unsupported = []
    for value in stored:
        try:
            if verify(password, value):
                return True
        except UnsupportedScheme as e:
            unsupported.append(str(e))
    if unsupported:
        raise UnsupportedScheme(", ".join(sorted(set(unsupported))))
    return False


def verify(password: str, stored: bytes) -> bool:
    match = _SCHEME_RE.match(stored)
    if match is None:
        raise UnsupportedScheme("cleartext")
    scheme = match.group(1).decode("ascii").upper()
    data = match.group(2)
    secret = password.encode("utf-8")
    if scheme in _DIGESTS:
        return _check_digest(_DIGESTS[scheme], secret, data, salted=False)
    if scheme.startswith("S") and scheme[1:] in _DIGESTS:
        return _check_digest(_DIGESTS[scheme[1:]], secret, data, salted=True)
    if scheme == "CRYPT" and crypt is not None:
        return _check_crypt(password, data)
    if scheme == "ARGON2":
        return _check_argon2(password, data)
    raise UnsupportedScheme("{" + scheme + "}")


def _check_digest(name: str, secret: bytes, data: bytes, *, salted: bool) -> bool:
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error:
        return False
    size = hashlib.new(name).digest_size
    digest, salt = raw[:size], raw[size:]
    if len(digest) != size or (salted and not salt) or (not salted and salt):
        return False
    return hmac.compare_digest(hashlib.new(name, secret + salt).digest(), digest)


def _check_crypt(password: str, data: bytes) -> bool:
    setting = data.decode("ascii", "replace")
    try:
        computed = crypt.crypt(password, setting)
    except (OSError, ValueError):  # a method this libc does not know; a NUL in the password
        return False
    return computed is not None and hmac.compare_digest(computed, setting)


def _check_argon2(password: str, data: bytes) -> bool:
    try:
        return _argon2.verify(data.decode("ascii"), password)
    except (
        argon2.exceptions.VerificationError,
        argon2.exceptions.InvalidHashError,
        UnicodeDecodeError,
    ):
        return False
