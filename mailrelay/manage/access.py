"""Who may use the control panel: admin API keys and admin logins, in one JSON file.

``<data_dir>/admin.json`` (mode 0600), changed by ``mailrelay-admin apikey`` and
``mailrelay-admin admin``, read by the daemon (reloaded when it changes)::

    {
      "admins": {"alice": {"created": 1762000000.0, "password_hash": "$argon2id$..."},
                 "acme-ops": {"account": "acme", "created": 1762000000.0,
                              "password_hash": "$argon2id$..."}},
      "api_keys": {"deploy": {"access": "read-write", "created": 1762000000.0,
                              "hash": "sha256:9f86d0..."}},
      "version": 1
    }

An admin or a key with an ``account`` is limited to that account (web/tenancy.py says
what that lets it see and change); without one it manages the whole relay.

mailrelay-admin changes it through FileAccessStore (IAccessStore); the daemon reads it
through AccessFile, which re-reads it when it changes.

An API key is 32 random bytes, so its SHA-256 is all that needs storing (there is nothing
to guess from it) and checking a key costs microseconds per request. Admin passwords are
chosen by people: argon2id, as for SMTP users.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.auth.passwords import is_password_hash
from mailrelay.files import StatKey, locked, read_with_stat, save_file, stat_key
from mailrelay.interfaces import IAccessStore

log = Logger()
T = TypeVar("T")

FORMAT_VERSION = 1
KEY_PREFIX = "mrk_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class AccessError(ValueError):
    """A refused change or an unusable file; the text says why."""


class Access(enum.StrEnum):
    READ_ONLY = "read-only"
    READ_WRITE = "read-write"


@dataclass(frozen=True)
class ApiKey:
    name: str
    access: Access
    hash: str  # "sha256:<hex>" of the key
    created: float
    account: str | None = None  # the one account it may manage; None: the whole relay


@dataclass(frozen=True)
class Admin:
    name: str
    password_hash: str
    created: float
    account: str | None = None  # the one account it may manage; None: the whole relay

    @property
    def fingerprint(self) -> str:
        """Changes whenever the password or the account does (a new hash has a new salt):
        what a panel session keeps to notice it, rather than the hash itself."""
        limit = "" if self.account is None else self.account
        return hashlib.sha256(f"{self.password_hash}\0{limit}".encode()).hexdigest()


@dataclass
class AccessData:
    api_keys: dict[str, ApiKey] = field(default_factory=dict)
    admins: dict[str, Admin] = field(default_factory=dict)

    def key_for(self, secret: str) -> ApiKey | None:
        digest = key_hash(secret)
        for key in self.api_keys.values():
            if secrets.compare_digest(key.hash, digest):
                return key
        return None


def key_hash(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise AccessError(
            f"{what} name {name!r} is not valid (letters, digits, '.', '_', '-', '@'; "
            "at most 64, starting with a letter or digit)"
        )


def check_account_name(account: str | None) -> None:
    """An account an admin or a key is limited to: a name as accounts have."""
    if account is not None:
        from mailrelay.directory.filedir import DirectoryFileError, check_account
        from mailrelay.model import Account

        try:
            check_account(Account(account))
        except DirectoryFileError as e:
            raise AccessError(str(e))


def access_path(config) -> str:
    """``[admin] access_file`` (by default ``<data_dir>/admin.json``, see config.DATA_FILES)."""
    return config.admin.access_file


# ---- the file ----


def _from_json(doc: Any) -> AccessData:
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise AccessError(f"not a version {FORMAT_VERSION} access file")
    data = AccessData()
    try:
        for name, entry in doc.get("api_keys", {}).items():
            data.api_keys[name] = ApiKey(
                name, Access(entry["access"]), str(entry["hash"]), float(entry["created"]),
                _account(entry),
            )
        for name, entry in doc.get("admins", {}).items():
            if not is_password_hash(entry["password_hash"]):
                raise AccessError(f"admin {name!r}: password_hash is not an argon2 hash")
            data.admins[name] = Admin(name, entry["password_hash"], float(entry["created"]),
                                      _account(entry))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, AccessError):
            raise
        raise AccessError(f"malformed entry: {e!r}")
    return data


def _account(entry: dict[str, Any]) -> str | None:
    account = entry.get("account")
    if account is not None and not isinstance(account, str):
        raise AccessError(f"account {account!r} is not a name")
    return account


def _limit(account: str | None) -> dict[str, str]:
    return {} if account is None else {"account": account}


def _to_json(data: AccessData) -> dict[str, Any]:
    return {
        "admins": {
            a.name: {"created": a.created, "password_hash": a.password_hash, **_limit(a.account)}
            for a in data.admins.values()
        },
        "api_keys": {
            k.name: {"access": str(k.access), "created": k.created, "hash": k.hash,
                     **_limit(k.account)}
            for k in data.api_keys.values()
        },
        "version": FORMAT_VERSION,
    }


def read_access(path: str) -> tuple[AccessData, StatKey | None]:
    """The file's data and the stat it was read at; a missing file grants nothing."""
    try:
        found = read_with_stat(path)
    except OSError as e:
        raise AccessError(f"{path}: cannot read: {e.strerror}")
    if found is None:
        return AccessData(), None
    raw, stat = found
    try:
        return _from_json(json.loads(raw)), stat
    except (ValueError, AccessError) as e:
        raise AccessError(f"{path}: {e}")


def write_access(path: str, data: AccessData) -> None:
    """Replace ``path`` atomically and durably (mode 0600: it holds password hashes)."""
    save_file(path, (json.dumps(_to_json(data), indent=2, sort_keys=True) + "\n").encode())


class AccessStore:
    """The access file as mailrelay-admin changes it: ``with store.change():`` locks,
    reloads, and saves only when the block ends without an error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data = AccessData()

    def load(self) -> None:
        self.data = read_access(self.path)[0]

    @contextlib.contextmanager
    def change(self) -> Iterator[AccessStore]:
        with locked(self.path):
            self.load()
            yield self
            write_access(self.path, self.data)

    def add_key(self, name: str, access: Access, account: str | None = None) -> str:
        """Store a new key (limited to ``account`` when given); returns the key itself,
        which is never stored."""
        check_name(name, "API key")
        check_account_name(account)
        if name in self.data.api_keys:
            raise AccessError(f"API key {name!r} already exists")
        secret = new_key()
        self.data.api_keys[name] = ApiKey(name, Access(access), key_hash(secret), time.time(),
                                          account)  # fmt: skip
        return secret

    def delete_key(self, name: str) -> ApiKey:
        try:
            return self.data.api_keys.pop(name)
        except KeyError:
            raise AccessError(f"unknown API key {name!r} (see mailrelay-admin apikey list)")

    def set_admin(self, name: str, password_hash: str, new: bool,
                  account: str | None = None) -> Admin:  # fmt: skip
        """Add an admin (``new``, limited to ``account`` when given) or change an existing
        admin's password (its account stays)."""
        check_name(name, "admin")
        check_account_name(account)
        current = self.data.admins.get(name)
        if new and current is not None:
            raise AccessError(f"admin {name!r} already exists")
        if not new and current is None:
            raise AccessError(f"unknown admin {name!r} (see mailrelay-admin admin list)")
        if current is not None:
            created, account = current.created, current.account
        else:
            created = time.time()
        admin = Admin(name, password_hash, created, account)
        self.data.admins[name] = admin
        return admin

    def delete_admin(self, name: str) -> Admin:
        try:
            return self.data.admins.pop(name)
        except KeyError:
            raise AccessError(f"unknown admin {name!r} (see mailrelay-admin admin list)")


@implementer(IAccessStore)
class FileAccessStore:
    """IAccessStore over the access file at ``path``; ``call`` runs the blocking work
    (manage.stores.at_once in mailrelay-admin)."""

    def __init__(self, path: str, call: Callable[..., defer.Deferred]) -> None:
        self.path = path
        self.call = call

    def _read(self, f: Callable[[AccessData], T]) -> defer.Deferred[T]:
        return self.call(lambda: f(read_access(self.path)[0]))

    def _change(self, f: Callable[[AccessStore], T]) -> defer.Deferred[T]:
        def locked() -> T:
            with AccessStore(self.path).change() as store:
                return f(store)

        return self.call(locked)

    def listKeys(self) -> defer.Deferred[list[ApiKey]]:
        return self._read(lambda data: sorted(data.api_keys.values(), key=lambda k: k.name))

    def addKey(self, name: str, access: Access, account: str | None = None
               ) -> defer.Deferred[str]:  # fmt: skip
        return self._change(lambda store: store.add_key(name, access, account))

    def deleteKey(self, name: str) -> defer.Deferred[ApiKey]:
        return self._change(lambda store: store.delete_key(name))

    def listAdmins(self) -> defer.Deferred[list[Admin]]:
        return self._read(lambda data: [data.admins[name] for name in sorted(data.admins)])

    def setAdmin(self, name: str, password_hash: str, new: bool,
                 account: str | None = None) -> defer.Deferred[Admin]:  # fmt: skip
        return self._change(lambda store: store.set_admin(name, password_hash, new, account))

    def deleteAdmin(self, name: str) -> defer.Deferred[Admin]:
        return self._change(lambda store: store.delete_admin(name))


class AccessFile:
    """The daemon's view of the access file: re-read when its stat changes, checked at
    most once per ``check_interval`` seconds of ``clock``. A file that breaks later is
    logged and the last good version stays in use."""

    def __init__(self, path: str, clock, check_interval: float = 1.0) -> None:
        self.path = path
        self._clock = clock
        self._check_interval = check_interval
        self._data, self._stat = read_access(path)
        self._checked = clock.seconds()

    def current(self) -> AccessData:
        if self._clock.seconds() - self._checked >= self._check_interval:
            self.refresh()
        return self._data

    def refresh(self) -> bool:
        """Re-read the file now if it changed; True if it did. A refused login asks this
        once before it is refused, so an admin added or given a new password by
        mailrelay-admin a moment ago can log in at once."""
        self._checked = self._clock.seconds()
        try:
            stat = stat_key(self.path)
        except OSError:
            stat = None
        if stat == self._stat:
            return False
        try:
            self._data, self._stat = read_access(self.path)
        except AccessError as e:
            self._stat = stat
            log.error("Keeping the previous admin access; {error}", error=e)
            return False
        return True
