"""Users and accounts as management sees them: the JSON documents (``user|account list
--json``, the API) and UserManager, the changes mailrelay-admin and the panel make.

Deleting a user deletes its suppression list and keeps its statistics as history, moved to
the name ``USER (deleted DATE TIME UTC)`` (spaces: no user can be called that), so they
still count in the account's totals. Adding a user does the same to whatever is still
stored under its name (a user deleted by editing the file, or mail of the deleted user
that was still queued): a new user never inherits a former one's suppressions or counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mailrelay.auth.passwords import hash_password
from mailrelay.directory.filedir import account_to_json, user_to_json
from mailrelay.features.archive import Archive
from mailrelay.features.stats import StatsStore
from mailrelay.features.suppressions import SuppressionStore
from mailrelay.interfaces import IUserStore, ReadOnly
from mailrelay.manage.stores import LDAP_MANAGED, Caller
from mailrelay.model import Account, SmtpUser


def user_json(user: SmtpUser, account: Account | None,
              last_login: tuple[float, str] | None = None) -> dict[str, Any]:
    """``user show --json``; ``last_login``: (unix time, address), from the login store."""
    expires = user.expires
    return {
        "username": user.username,
        "kind": str(user.kind),
        "sender_scope": str(user.effective_scope(account)),
        **user_to_json(user),
        "expires": None if expires is None else
        datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "last_login": last_login[0] if last_login else None,
        "last_login_ip": last_login[1] if last_login else None,
    }


def account_json(account: Account, users: list[SmtpUser]) -> dict[str, Any]:
    """``account show --json``."""
    return {"name": account.name, **account_to_json(account), "users": [u.username for u in users]}


# ---- what a user leaves behind ----


@dataclass(frozen=True)
class Forgotten:
    """What was stored under a user's (or an account's) name: its suppressions (removed)
    and its statistics (``stats`` counter rows) and archive, moved to ``label``."""

    suppressions: int
    stats: int
    label: str
    archived: bool = False  # its archive Maildir moved to ``label`` too
    kind: str = "user"

    def said(self) -> str:
        kept = (f"statistics kept as {self.kind} {self.label!r}" if self.stats
                else "no statistics")  # fmt: skip
        if self.archived:
            kept += f", archive kept as {self.label!r}"
        return f"{self.suppressions} suppressed address(es) removed, {kept}"


def retired_name(name: str, when: float) -> str:
    return f"{name} (deleted {datetime.fromtimestamp(when, UTC):%Y-%m-%d %H:%M:%S} UTC)"


def forget_user(suppressions, stats, username: str, when: float,
                archive: Archive | None = None) -> Forgotten:
    """Remove the suppressions stored under ``username`` and move its statistics and its
    archive to retired_name (blocking), so that nothing of it passes to a new user of
    the same name."""
    label = retired_name(username, when)
    archived = archive is not None and archive.retire(username, label)
    return Forgotten(suppressions.remove_user(username), stats.retire_user(username, label),
                     label, archived)  # fmt: skip


def forget_account(suppressions, stats, name: str, when: float) -> Forgotten:
    """The same for a deleted account (which has no users left): its lists go, its
    statistics move to retired_name, so a new account of that name starts with none."""
    label = retired_name(name, when)
    return Forgotten(suppressions.remove_account(name), stats.retire_account(name, label),
                     label, kind="account")  # fmt: skip


class _Nothing:
    """A store file that does not exist yet holds nothing (and is not made here)."""

    def remove_user(self, user: str) -> int:
        return 0

    remove_account = remove_user

    def retire_user(self, user: str, label: str) -> int:
        return 0

    retire_account = retire_user

    def close(self) -> None:
        pass


def in_files(forget: Callable[..., Forgotten], suppressions_db: str, stats_db: str,
             *extra: Any) -> Callable[[str, float], Forgotten]:
    """``forget`` (forget_user, forget_account) over the store files, opened for the call
    (mailrelay-admin: the daemon keeps its stores open); ``extra`` goes after ``when``."""

    def forget_now(name: str, when: float) -> Forgotten:
        stores = [kind(path) if os.path.exists(path) else _Nothing() for kind, path in
                  ((SuppressionStore, suppressions_db), (StatsStore, stats_db))]
        try:
            return forget(*stores, name, when, *extra)
        finally:
            for store in stores:
                store.close()

    return forget_now


def forget_in_files(suppressions_db: str, stats_db: str,
                    archive_dir: str | None = None) -> Callable[[str, float], Forgotten]:
    """forget_user over the store files (and the archive under ``archive_dir``)."""
    return in_files(forget_user, suppressions_db, stats_db,
                    Archive(archive_dir) if archive_dir else None)


# ---- changes ----


class UserManager:
    """Users and accounts over an IUserStore, with what goes with them: hashing the
    password, forgetting what a user left behind, marking new senders as waiting.

    ``call`` runs blocking work (stores.threaded in the daemon, stores.at_once in
    mailrelay-admin); ``forget(username, when)`` is blocking too (forget_user over the
    suppression and statistics stores); ``clock`` gives the time; ``verify`` is whether
    senders added here wait for confirmation (``[admin] verify_senders``).
    """

    def __init__(self, store: IUserStore, call: Caller,
                 forget: Callable[[str, float], Forgotten], clock,
                 verify: bool = False,
                 forget_account: Callable[[str, float], Forgotten] | None = None,
                 ) -> None:  # fmt: skip
        self.store = store
        self.call = call
        self._forget = forget
        self._forget_account = forget_account
        self.clock = clock
        self.verify = verify

    @property
    def writable(self) -> bool:
        return self.store.writable

    def check_writable(self) -> None:
        """ReadOnly now, before anything else is asked (a password, a setting)."""
        if not self.store.writable:
            raise ReadOnly(LDAP_MANAGED)

    # -- reading --

    async def get(self, username: str) -> tuple[SmtpUser | None, Account | None]:
        user = await self.store.getUser(username)
        if user is None:
            return None, None
        return user, await self.store.getAccount(user.account)

    async def users(self, account: str | None = None
                    ) -> tuple[list[SmtpUser], dict[str, Account]]:  # fmt: skip
        """The users (of ``account``) and every account by name."""
        users = await self.store.listUsers(account)
        return users, {a.name: a for a in await self.store.listAccounts()}

    async def accounts(self, only: str | None = None) -> list[tuple[Account, list[SmtpUser]]]:
        """Every account with its users (``only``: just that one, if it exists)."""
        accounts = [a for a in await self.store.listAccounts() if only in (None, a.name)]
        users = await self.store.listUsers(only)
        return [(a, [u for u in users if u.account == a.name]) for a in accounts]

    async def account(self, name: str) -> tuple[Account, list[SmtpUser]] | None:
        account = await self.store.getAccount(name)
        if account is None:
            return None
        return account, await self.store.listUsers(name)

    # -- users --

    async def add(self, new: SmtpUser, password: str) -> SmtpUser:
        self.check_writable()
        password_hash = await self.call(hash_password, password)  # before the lock: slow
        return await self.store.addUser(new, password_hash, self.verify)

    async def update(self, username: str, change: Callable[[SmtpUser], dict[str, Any]]
                     ) -> tuple[SmtpUser, SmtpUser]:  # fmt: skip
        self.check_writable()
        return await self.store.updateUser(username, change, self.verify)

    async def set_password(self, username: str, password: str) -> SmtpUser:
        self.check_writable()
        password_hash = await self.call(hash_password, password)
        return await self.store.setPassword(username, password_hash)

    async def delete(self, username: str) -> SmtpUser:
        """Deletes the user only: forget() what it left behind."""
        self.check_writable()
        return await self.store.deleteUser(username)

    async def forget(self, username: str) -> Forgotten:
        """Remove the suppressions stored under ``username``, retire its statistics."""
        return await self.call(self._forget, username, self.clock.seconds())

    async def confirm(self, username: str, entry: str) -> SmtpUser | None:
        return await self.store.confirmSender(username, entry)

    # -- accounts --

    async def add_account(self, account: Account) -> Account:
        return await self.store.addAccount(account)

    async def update_account(self, name: str,
                             change: Callable[[Account], dict[str, Any]]) -> Account:
        return await self.store.updateAccount(name, change)

    async def delete_account(self, name: str) -> Account:
        """Deletes the account only: forget_account() what it left behind."""
        return await self.store.deleteAccount(name)

    async def forget_account(self, name: str) -> Forgotten | None:
        """Remove the suppression lists of account ``name``, retire its statistics."""
        if self._forget_account is None:
            return None
        return await self.call(self._forget_account, name, self.clock.seconds())
