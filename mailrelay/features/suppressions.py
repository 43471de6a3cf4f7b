"""Suppressed recipients: addresses a user's (or an account's, or every) mail must not reach.

Three levels, one table: a user's list (account and user set), an account-wide list
(user empty) and the relay-wide global list (both empty). The account is part of every
key, so one account never sees or affects another's entries. Addresses are compared in
lower case.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass

from mailrelay.features.db import SqliteStore

_CHUNK = 500  # addresses per query, under SQLite's parameter limit


class Reason(enum.StrEnum):
    UNSUBSCRIBE = "unsubscribe"
    HARD_BOUNCE = "hard-bounce"
    MANUAL = "manual"
    COMPLAINT = "complaint"  # the recipient reported the mail as spam (bounces/feed.py)


@dataclass(frozen=True)
class Suppression:
    address: str
    account: str | None  # None: global
    user: str | None  # None: the whole account (or global)
    reason: Reason
    created: float  # unix time


class SuppressionStore(SqliteStore):
    # Schema versions (db.py); 1: the schema from before files carried a version.
    MIGRATIONS = {1: """
    CREATE TABLE IF NOT EXISTS suppressions (
        account TEXT NOT NULL,
        user TEXT NOT NULL,
        address TEXT NOT NULL,
        reason TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (account, user, address)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS suppressions_by_address ON suppressions (address);
    """}

    def add(
        self,
        address: str,
        account: str | None = None,
        user: str | None = None,
        reason: Reason = Reason.MANUAL,
        when: float | None = None,
    ) -> bool:
        """Suppress ``address``; False if it already was (the first entry is kept)."""
        key = _key(account, user)
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO suppressions VALUES (?, ?, ?, ?, ?)",
                (*key, address.strip().lower(), Reason(reason).value, when or time.time()),
            )
            return cursor.rowcount == 1

    def remove(self, address: str, account: str | None = None, user: str | None = None) -> bool:
        with self.transaction() as db:
            cursor = db.execute(
                "DELETE FROM suppressions WHERE account = ? AND user = ? AND address = ?",
                (*_key(account, user), address.strip().lower()),
            )
            return cursor.rowcount == 1

    def remove_user(self, user: str) -> int:
        """Drop the list of the user named ``user`` (in whichever account it was): when it
        is deleted, or when the name is given to a new user. How many went."""
        if not user:
            raise ValueError("empty user name")
        with self.transaction() as db:
            return db.execute("DELETE FROM suppressions WHERE user = ?", (user,)).rowcount

    def remove_account(self, account: str) -> int:
        """Drop every list of ``account`` (its own and its users'): when it is deleted, so
        that a new account of the same name starts with none. How many went."""
        if not account:
            raise ValueError("empty account name")
        with self.transaction() as db:
            return db.execute("DELETE FROM suppressions WHERE account = ?",
                              (account,)).rowcount

    def of_user(self, user: str) -> list[Suppression]:
        """The rows stored for the user named ``user`` in any account: also those of a user
        that no longer exists."""
        return self._select("user = ?", (user,), "account, address")

    def list(self, account: str | None = None, user: str | None = None) -> list[Suppression]:
        """Global entries (no account); an account's entries, account-wide and per user (no
        user); or one user's entries. Sorted by address."""
        if account is None:
            where, params = "account = '' AND user = ''", ()
        elif user is None:
            where, params = "account = ?", (account,)
        else:
            where, params = "account = ? AND user = ?", _key(account, user)
        return self._select(where, params, "address, user")

    def all(self) -> list[Suppression]:
        """Every entry: the global list, then each account's, sorted."""
        return self._select("1", (), "account, user, address")

    def _select(self, where: str, params: tuple, order: str) -> list[Suppression]:
        rows = self.fetch(
            "SELECT address, account, user, reason, created FROM suppressions"
            f" WHERE {where} ORDER BY {order}",
            params,
        )
        return [Suppression(a, acc or None, u or None, Reason(r), c) for a, acc, u, r, c in rows]

    def suppressed(self, account: str, user: str, addresses: Iterable[str]) -> set[str]:
        """Which of ``addresses`` (as given) ``user`` of ``account`` must not send to: on
        the user's, the account's or the global list."""
        wanted: dict[str, list[str]] = {}
        for address in addresses:
            wanted.setdefault(address.strip().lower(), []).append(address)
        keys = list(wanted)
        found: set[str] = set()
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self.fetch(
                f"SELECT address FROM suppressions WHERE address IN ({marks}) AND ("
                "(account = '' AND user = '') OR (account = ? AND user IN ('', ?)))",
                (*chunk, account, user),
            )
            for (address,) in rows:
                found.update(wanted[address])
        return found

    def contains(self, address: str, account: str, user: str) -> bool:
        return bool(self.suppressed(account, user, [address]))


def _key(account: str | None, user: str | None) -> tuple[str, str]:
    if user is not None and account is None:
        raise ValueError("a user's suppression needs the user's account")
    if account == "" or user == "":
        raise ValueError("empty account or user name")
    return account or "", user or ""
