"""DKIM keys as management sees them: IDkimKeys over the key directory (mailrelay/dkim.py),
its JSON document (``dkim list --json``) and the TXT record to publish.

A change is made under the index's lock: the key file is written first (mode 0600), then
the index, both atomically (files.save_file), so the delivery process never finds an
index entry without its key. Blocking calls run through ``call`` (manage.stores.threaded
in the daemon, at_once in mailrelay-admin). The storage is the few methods under "the key
directory" below; postgres/dkim.py keeps the same keys in PostgreSQL (``keys_of_config``
chooses).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from zope.interface import implementer

from mailrelay.dkim import INDEX, TYPES, DkimKey, new_private_key, public_key_text, read_index
from mailrelay.files import locked, save_file, unlink_quietly
from mailrelay.interfaces import IDkimKeys
from mailrelay.manage.stores import Caller
from mailrelay.scope import ScopeError, is_domain, to_ascii_domain

SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
TXT_CHUNK = 255  # the most one character-string of a TXT record holds (RFC 1035 3.3)


class DkimError(Exception):
    """A refused change: the text says why."""


class UnknownKey(DkimError):
    """No such key (or none for the domain)."""


class KeyConflict(DkimError):
    """The change conflicts with what exists (a selector taken, a domain of two accounts,
    a key in another state, a record not yet in DNS)."""


def dkim_json(key: DkimKey, record: tuple[str, str] | None = None) -> dict[str, Any]:
    out = key.to_json()
    if record is not None:
        out["dns_name"], out["dns_value"] = record
        out["dns_strings"] = txt_strings(record[1])
    return out


def txt_strings(value: str) -> list[str]:
    """The TXT value as the character-strings of one record, each at most 255 bytes."""
    return [value[i:i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)] or [""]


def zone_line(name: str, value: str) -> str:
    """The TXT record as a zone file line: ``NAME. IN TXT ( "..." "..." )``."""
    quoted = " ".join(f'"{s}"' for s in txt_strings(value))
    return f"{name}. IN TXT ( {quoted} )"


# domaincheck's status of a key's record, as ``published`` says it.
PUBLISHED = {"ok": "ok", "missing": "missing", "wrong": "different", "unknown": "unknown"}


async def published(resolver, key: DkimKey, record: tuple[str, str]) -> str:
    """Whether ``record`` is in DNS: ok, missing, different (another key is published
    there) or unknown (DNS gave no answer)."""
    from mailrelay.manage.domaincheck import check_dkim

    return PUBLISHED[(await check_dkim(resolver, key, record))["status"]]


async def look_up(resolver, pairs: list[tuple[DkimKey, tuple[str, str]]]) -> list[str]:
    """``published`` of each (key, record), looked up all at once (with DNS down, one wait
    for all, not one per key)."""
    return await defer.gatherResults(
        [defer.ensureDeferred(published(resolver, k, r)) for k, r in pairs], consumeErrors=True)


async def _documents(store, keys: list[DkimKey], resolver, with_record: bool
                     ) -> list[dict[str, Any]]:
    """The keys' documents; with ``resolver``, ``published`` for each. A retiring key's
    says from when its record can be withdrawn (``withdraw_after``)."""
    pairs = [(k, await store.txtRecord(k)) for k in keys]
    docs = [dkim_json(k, r if with_record else None) for k, r in pairs]
    for key, doc in zip(keys, docs, strict=True):
        if key.state == "retiring":
            doc["withdraw_after"] = (key.changed or key.created) + store.retire_after
    if resolver is not None:
        for doc, status in zip(docs, await look_up(resolver, pairs), strict=True):
            doc["published"] = status
    return docs


async def listed(store, resolver=None, account: str | None = None) -> list[dict[str, Any]]:
    """``dkim list --json``: every key (only ``account``'s when given: not the relay
    domain's either), without its record; with ``resolver``, whether each record is
    ``published``."""
    keys = await owned(store, account)
    return await _documents(store, keys, resolver, with_record=False)


async def owned(store, account: str | None = None) -> list[DkimKey]:
    """Every key, or only those signing ``account``'s mail."""
    keys = await store.list()
    return keys if account is None else [k for k in keys if k.account == account]


async def shown(store, domain: str, resolver=None) -> list[dict[str, Any]]:
    """``dkim show --json``: the domain's keys with the TXT records to publish; with
    ``resolver``, whether each is ``published``."""
    keys = await store.ofDomain(domain)
    if not keys:
        raise UnknownKey(f"{domain} has no DKIM key")
    return await _documents(store, keys, resolver, with_record=True)


async def activate(store, resolver, domain: str,
                   selector: str | None = None) -> tuple[DkimKey, list[DkimKey]]:
    """Switch signing to the domain's pending key (``selector``: it must be that one), only
    once its record is seen in DNS: the receivers of the first mail signed with it must
    find it. Fires with the key and the keys it replaces (now retiring)."""
    pending = [k for k in await store.ofDomain(domain) if k.state == "pending"
               and selector in (None, k.selector)]  # fmt: skip
    if not pending:
        which = "" if selector is None else f" with selector {selector!r}"
        raise UnknownKey(f"{domain} has no pending key{which} "
                         f"(mailrelay-admin dkim rotate {domain})")
    key = pending[0]
    record = await store.txtRecord(key)
    status = await published(resolver, key, record)
    await store.recordChecks({(key.domain, key.selector): status})
    if status != "ok":
        raise KeyConflict(f"{record[0]} is {status} in DNS: publish the record "
                          f"(mailrelay-admin dkim show {domain}) and activate again")
    return await store.promote(domain, key.selector)


async def key_owner(users, domain: str, relay_domain: str = "") -> str | None:
    """The one account (of the UserManager ``users``) that has ``domain`` as an authorized
    domain: a key signs only that account's mail. None for ``[dkim] relay_domain``: its
    keys sign for every account."""
    if relay_domain and domain == relay_domain:
        return None
    accounts = [a.name for a, _ in await users.accounts() if domain in a.domains]
    if not accounts:
        raise DkimError(f"{domain} is not an authorized domain of any account "
                        "(mailrelay-admin account set NAME --add-domain DOMAIN)")
    if len(accounts) > 1:
        raise KeyConflict(f"{domain} is authorized for several accounts "
                          f"({', '.join(accounts)}): it can be signed for one only")
    return accounts[0]


def domain_name(domain: str) -> str:
    try:
        name = to_ascii_domain(domain.strip().rstrip("."))
    except ScopeError as e:
        raise DkimError(str(e))
    if not is_domain(name):
        raise DkimError(f"{domain!r} is not a domain name")
    return name


@implementer(IDkimKeys)
class DkimKeys:
    def __init__(self, directory: str, call: Caller, clock=time,
                 retire_after: float = 7 * 86400.0) -> None:  # fmt: skip
        self.directory = directory
        self.call = call
        self.clock = clock
        self.retire_after = retire_after  # [dkim] retire_after: for withdraw_after

    @property
    def _index(self) -> str:
        return os.path.join(self.directory, INDEX)

    # -- the key directory --

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Changes take turns: read, change and save under one lock."""
        self._make_directory()
        with locked(self._index):
            yield

    def _keys(self) -> list[DkimKey]:
        got = read_index(self.directory)
        return got[0] if got else []

    def _save(self, keys: list[DkimKey]) -> None:
        keys = sorted(keys, key=lambda k: (k.domain, k.selector))
        save_file(self._index, json.dumps([k.to_json() for k in keys], indent=1).encode())

    def _store_private(self, key: DkimKey, pem: bytes) -> None:
        """Keep a new key's private key (before ``_save`` lists the key)."""
        save_file(os.path.join(self.directory, key.file_name), pem, mode=0o600)

    def _drop_private(self, key: DkimKey) -> None:
        """Forget a key's private key (after ``_save`` no longer lists the key)."""
        unlink_quietly(os.path.join(self.directory, key.file_name))

    def _private_pem(self, key: DkimKey) -> bytes:
        with open(os.path.join(self.directory, key.file_name), "rb") as f:
            return f.read()

    # -- the keys --

    def list(self):
        return self.call(lambda: sorted(self._keys(), key=lambda k: (k.domain, k.selector)))

    def ofDomain(self, domain: str):
        name = domain_name(domain)
        return self.call(lambda: [k for k in self._keys() if k.domain == name])

    def add(self, domain: str, account: str | None, selector: str | None, kind: str,
            bits: int, state: str | None = None):
        return self.call(self._add, domain_name(domain), account, selector, kind, bits, state)

    def _add(self, domain: str, account: str | None, selector: str | None, kind: str,
             bits: int, state: str | None = None) -> DkimKey:
        if kind not in TYPES:
            raise DkimError(f"key type {kind!r}: rsa or ed25519")
        if kind == "rsa" and not 1024 <= bits <= 4096:
            raise DkimError(f"--bits {bits}: from 1024 to 4096 (2048 is the usual)")
        now = self.clock.time()
        selector = (selector or time.strftime("%Y%m", time.gmtime(now))
                    + ("e" if kind == "ed25519" else "")).lower()  # fmt: skip
        if not SELECTOR.fullmatch(selector):
            raise DkimError(f"selector {selector!r}: letters, digits and '-' (one DNS label)")
        with self._locked():
            keys = self._keys()
            if any(k.domain == domain and k.selector == selector for k in keys):
                raise KeyConflict(f"{domain} already has a key with selector {selector!r}")
            if state is None:  # a second key of a type would sign before it is published
                state = "pending" if any(k.domain == domain and k.type == kind
                                         and k.state == "active" for k in keys) else "active"
            if state == "pending" and any(k.domain == domain and k.state == "pending"
                                          for k in keys):  # fmt: skip
                raise KeyConflict(f"{domain} already has a pending key: activate it first "
                                  f"(mailrelay-admin dkim activate {domain})")
            key = DkimKey(domain, selector, kind, state, account, now)
            private = new_private_key(kind, bits)
            pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            self._store_private(key, pem)
            self._save([*keys, key])
        return key

    def _make_directory(self) -> None:
        """Run as root, a new key directory gets the owner of the data directory above
        it, so that a relay running as its own user can read the keys."""
        if os.path.isdir(self.directory):
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            st = os.stat(os.path.dirname(os.path.abspath(self.directory)))
            os.chown(self.directory, st.st_uid, st.st_gid)

    def remove(self, domain: str, selector: str):
        return self.call(self._remove, domain_name(domain), selector.lower())

    def _remove(self, domain: str, selector: str) -> DkimKey:
        with self._locked():
            keys = self._keys()
            found = [k for k in keys if k.domain == domain and k.selector == selector]
            if not found:
                raise UnknownKey(f"{domain} has no key with selector {selector!r}")
            self._save([k for k in keys if k not in found])  # unused first, then gone
            self._drop_private(found[0])
        return found[0]

    def promote(self, domain: str, selector: str):
        return self.call(self._promote, domain_name(domain), selector.lower())

    def _promote(self, domain: str, selector: str) -> tuple[DkimKey, list[DkimKey]]:
        """The pending key becomes active; the active keys of its type, retiring."""
        now = self.clock.time()
        with self._locked():
            keys = self._keys()
            found = [k for k in keys if k.domain == domain and k.selector == selector
                     and k.state == "pending"]  # fmt: skip
            if not found:
                raise UnknownKey(f"{domain} has no pending key with selector {selector!r}")
            key = replace(found[0], state="active", changed=now)
            old = [replace(k, state="retiring", changed=now) for k in keys
                   if k.domain == domain and k.type == key.type and k.state == "active"]
            gone = {(k.domain, k.selector) for k in [key, *old]}
            self._save([k for k in keys if (k.domain, k.selector) not in gone] + [key, *old])
        return key, old

    def retire(self, domain: str, selector: str):
        return self.call(self._retire, domain_name(domain), selector.lower())

    def _retire(self, domain: str, selector: str) -> DkimKey:
        """Remove a retiring key (one that no longer signs)."""
        found = [k for k in self._keys() if k.domain == domain and k.selector == selector]
        if found and found[0].state != "retiring":
            raise KeyConflict(f"{domain} selector {selector!r} is {found[0].state}, not "
                              "retiring: only a key replaced by dkim activate can be retired")
        return self._remove(domain, selector)

    def recordChecks(self, results: dict[tuple[str, str], str], when: float | None = None):
        return self.call(self._record_checks, results,
                         self.clock.time() if when is None else when)

    def _record_checks(self, results: dict[tuple[str, str], str], when: float) -> list[DkimKey]:
        """Keep each key's look-up result (``(domain, selector) -> published``): the keys
        as they are now (one deleted meanwhile is left out), with their last result. A
        result older than the one kept is dropped: of several relays checking the same
        keys, the latest look-up stands whatever the order they save in."""
        with self._locked():
            keys = [replace(k, dns_status=results[(k.domain, k.selector)], dns_checked=when)
                    if (k.domain, k.selector) in results
                    and (k.dns_checked is None or k.dns_checked <= when) else k
                    for k in self._keys()]
            self._save(keys)
        return [k for k in keys if (k.domain, k.selector) in results]

    def txtRecord(self, key: DkimKey):
        return self.call(self._record, key)

    def _record(self, key: DkimKey) -> tuple[str, str]:
        private = serialization.load_pem_private_key(self._private_pem(key), None)
        return (f"{key.selector}._domainkey.{key.domain}",
                f"v=DKIM1; k={key.type}; p={public_key_text(private)}")


def keys_of_config(config, call: Caller):
    """The relay's IDkimKeys: in PostgreSQL under ``[cluster] postgres``, else the key
    directory ``[dkim] directory``."""
    d = config.dkim
    from mailrelay.postgres.db import of_config

    db = of_config(config)
    if db is not None:
        from mailrelay.postgres.dkim import PgDkimKeys

        return PgDkimKeys(db, call, retire_after=d.retire_after)
    return DkimKeys(d.directory, call, retire_after=d.retire_after)
