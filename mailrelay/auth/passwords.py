"""Password hashing (argon2id) and generation.

Parameters follow the OWASP Password Storage Cheat Sheet's first argon2id choice:
19 MiB of memory, 2 iterations, 1 lane. One verification takes about 25 ms of one core
and 19 MiB, so a relay can afford it per login (the checker caches verified logins for
webmail backends that log in per message) while an offline attacker with the file pays
the same per guess. Every function here is synchronous and CPU-bound: callers in the
daemon run them in a thread.
"""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher(
    time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID
)

# Verified in place of a missing user's hash, so an unknown username costs the same time
# as a wrong password. Same parameters as _HASHER (a test keeps them in step); the
# password it was made from was random and thrown away.
DUMMY_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$LsW55mDXgX7cXQViL32G4g"
    "$+M16dJqWJJnkyyNqSt154EBVu7ohOW0gjmw5E3zLFpc"
)

# The one text of every failed login: an unknown user and a wrong password look the same.
LOGIN_FAILED = "invalid username or password"

# No look-alikes (0/O/o, 1/l/I) and nothing a shell or a config file would need quoted:
# a password is read aloud, pasted into mail clients and typed on phones.
ALPHABET = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
GENERATED_LENGTH = 20  # 20 symbols from 56: about 116 bits


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when ``password`` matches; False for a mismatch, a hash that is not argon2, or
    a password that is not text (lone surrogates from undecodable client bytes)."""
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError, UnicodeEncodeError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with other parameters than today's."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


def is_password_hash(text: str) -> bool:
    """True when ``text`` looks like an argon2 hash (checked when the user file is loaded)."""
    return isinstance(text, str) and text.startswith(("$argon2id$", "$argon2i$", "$argon2d$"))


def generate_password(length: int = GENERATED_LENGTH) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))
