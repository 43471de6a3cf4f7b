"""The file directory: accounts and SMTP users in one human-readable JSON file.

The embedded default directory. ``mailrelay-admin`` changes it through UserStore (a lock,
then an atomic rewrite); the daemon reads it through FileDirectory, which notices a new
version by its stat and reloads it without a restart. The file::

    {
      "accounts": {
        "default": {"domains": "doe.com;example.org", "note": "", "notify": "ops@doe.com"}
      },
      "users": {
        "doe.com": {
          "account": "default", "addresses": "", "domains": "", "note": "office clients",
          "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$...", "priority": 3,
          "rate_limit": null, "max_connections": null, "status": "allowed", ...
        }
      },
      "version": 1
    }

Users are keyed by their canonical username (model.canonical_username); ``domains`` and
``addresses`` are the sender scope of a named user, written as in the admin commands.
The file holds password hashes, so it is written with mode 0600.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.auth.hashing import HashingPool
from mailrelay.auth.ipauth import IpAuthError
from mailrelay.auth.lifecycle import parse_networks
from mailrelay.auth.passwords import (
    DUMMY_HASH,
    LOGIN_FAILED,
    is_password_hash,
    verify_password,
)
from mailrelay.files import StatKey, locked, read_with_stat, save_file, stat_key
from mailrelay.interfaces import IDirectory
from mailrelay.model import QUOTA_ACTIONS, Account, Kind, SmtpUser, Status, canonical_username
from mailrelay.scope import (
    Scope,
    ScopeError,
    is_address,
    is_domain,
    parse_addresses,
    parse_domains,
)

log = Logger()

FORMAT_VERSION = 1
DEFAULT_ACCOUNT = "default"
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# No ":" so that a username cannot pass for a prefixed avatar id ("ip:...") or break
# "user:password" forms; no "@" so that it is never mistaken for an address.
_NAMED_USERNAME = re.compile(r"[^\s@:\x00-\x1f\x7f]{1,255}")


class DirectoryFileError(ValueError):
    """The user file cannot be used, or a change to it is refused; the text says why."""


class UnknownEntry(DirectoryFileError):
    """The user or account named does not exist."""


class EntryConflict(DirectoryFileError):
    """The change conflicts with what exists: a name taken, an account still in use."""


@dataclasses.dataclass
class UserData:
    """The content of a user file: accounts, users and their password hashes."""

    accounts: dict[str, Account]
    users: dict[str, SmtpUser]
    hashes: dict[str, str]

    @classmethod
    def empty(cls) -> UserData:
        return cls({DEFAULT_ACCOUNT: Account(DEFAULT_ACCOUNT)}, {}, {})

    def users_of(self, account: str) -> list[SmtpUser]:
        return [u for _, u in sorted(self.users.items()) if u.account == account]


# ---- the JSON form of accounts and users (also what `--json` prints, minus the hash) ----


def account_to_json(account: Account) -> dict[str, Any]:
    return {
        "domains": ";".join(sorted(account.domains)),
        "notify": account.notify,
        "note": account.note,
        "bounce_domain": account.bounce_domain,
        "quota_day": account.quota_day,
        "quota_month": account.quota_month,
    }


def user_to_json(user: SmtpUser) -> dict[str, Any]:
    """Every SmtpUser field except the username (the key); never a password hash."""
    return {
        "account": user.account,
        "domains": user.scope.domains_text(),
        "addresses": user.scope.addresses_text(),
        "status": str(user.status),
        "note": user.note,
        "rate_limit": user.rate_limit,
        "priority": user.priority,
        "max_connections": user.max_connections,
        "quota_day": user.quota_day,
        "quota_month": user.quota_month,
        "quota_action": user.quota_action,
        "archive": user.archive,
        "audit_bcc": ";".join(user.audit_bcc),
        "bounce_notify": user.bounce_notify,
        "unsubscribe_footer": user.unsubscribe_footer,
        "open_tracking": user.open_tracking,
        "click_tracking": user.click_tracking,
        "updated": user.updated,
        "expires": user.expires,
        "allow_from": ";".join(user.allow_from),
    }


def _field(entry: Mapping, key: str, types: tuple[type, ...], default: Any) -> Any:
    if key not in entry:
        return default
    value = entry[key]
    # bool is an int in Python: a priority of true is still a mistake.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise DirectoryFileError(f"{key} must be {names}, not {json.dumps(value)}")
    return value


def _account_from_json(name: str, entry: Any) -> Account:
    if not isinstance(entry, dict):
        raise DirectoryFileError("must be an object")
    unknown = set(entry) - set(account_to_json(Account("x")))
    if unknown:
        raise DirectoryFileError(f"unknown field(s) {', '.join(sorted(unknown))}")
    return Account(
        name=name,
        domains=parse_domains(_field(entry, "domains", (str,), "")),
        notify=_field(entry, "notify", (str, type(None)), None) or None,
        note=_field(entry, "note", (str,), ""),
        bounce_domain=_field(entry, "bounce_domain", (str, type(None)), None) or None,
        quota_day=_quota(entry, "quota_day"),
        quota_month=_quota(entry, "quota_month"),
    )


def quota_action(value: str) -> str:
    """``refuse`` or ``hold`` (model.QUOTA_ACTIONS); DirectoryFileError otherwise."""
    if value not in QUOTA_ACTIONS:
        raise DirectoryFileError(f"quota_action {value!r} is not one of refuse, hold")
    return value


def _quota(entry: Mapping, key: str) -> int | None:
    value = _field(entry, key, (int, type(None)), None)
    if value is not None and value < 0:
        raise DirectoryFileError(f"{key} {value} is below 0")
    return value


_USER_FIELDS = set(user_to_json(SmtpUser("x"))) | {"password_hash", "unverified"}


def scope_entries(user: SmtpUser) -> frozenset[str]:
    """The domains and addresses of the user's own sender scope (not limited by account)."""
    scope = user.effective_scope()
    return scope.domains | scope.addresses


def _parse_entries(text: str) -> frozenset[str]:
    """``a.com;x@b.com``: domains and addresses mixed, as ``unverified`` holds them."""
    items = [item.strip() for item in text.split(";") if item.strip()]
    return parse_domains(";".join(i for i in items if "@" not in i)) | parse_addresses(
        ";".join(i for i in items if "@" in i)
    )


def _allow_from(text: str) -> tuple[str, ...]:
    try:
        return parse_networks(text)
    except IpAuthError as e:
        raise DirectoryFileError(f"allow_from: {e}")


def _user_from_json(username: str, entry: Any) -> tuple[SmtpUser, str]:
    if not isinstance(entry, dict):
        raise DirectoryFileError("must be an object")
    unknown = set(entry) - _USER_FIELDS
    if unknown:
        raise DirectoryFileError(f"unknown field(s) {', '.join(sorted(unknown))}")
    password_hash = entry.get("password_hash")
    if not is_password_hash(password_hash):
        raise DirectoryFileError("password_hash is missing or not an argon2 hash")
    status = _field(entry, "status", (str,), "allowed")
    try:
        status = Status(status)
    except ValueError:
        raise DirectoryFileError(f"status {status!r} is not one of allowed, blocked, sandboxed")
    bcc = _field(entry, "audit_bcc", (str,), "")
    user = SmtpUser(
        username=username,
        account=_field(entry, "account", (str,), DEFAULT_ACCOUNT),
        scope=Scope.parse(
            _field(entry, "domains", (str,), ""), _field(entry, "addresses", (str,), "")
        ),
        status=status,
        note=_field(entry, "note", (str,), ""),
        rate_limit=_field(entry, "rate_limit", (int, type(None)), None),
        priority=_field(entry, "priority", (int,), 3),
        max_connections=_field(entry, "max_connections", (int, type(None)), None),
        quota_day=_quota(entry, "quota_day"),
        quota_month=_quota(entry, "quota_month"),
        quota_action=quota_action(_field(entry, "quota_action", (str,), "refuse")),
        archive=_field(entry, "archive", (bool,), False),
        audit_bcc=tuple(sorted(parse_addresses(bcc))),
        bounce_notify=_field(entry, "bounce_notify", (str,), "sender"),
        unsubscribe_footer=_field(entry, "unsubscribe_footer", (bool,), False),
        open_tracking=_field(entry, "open_tracking", (bool,), False),
        click_tracking=_field(entry, "click_tracking", (bool,), False),
        updated=float(_field(entry, "updated", (int, float), 0.0)),
        unverified=_parse_entries(_field(entry, "unverified", (str,), "")),
        expires=_field(entry, "expires", (int, float, type(None)), None),
        allow_from=_allow_from(_field(entry, "allow_from", (str,), "")),
    )
    return user, password_hash


def data_from_json(doc: Any) -> UserData:
    """Parse and check a whole file; DirectoryFileError names the entry and the problem."""
    if not isinstance(doc, dict):
        raise DirectoryFileError("the top level must be an object")
    unknown = set(doc) - {"accounts", "users", "version"}
    if unknown:
        raise DirectoryFileError(f"unknown top-level field(s) {', '.join(sorted(unknown))}")
    if doc.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise DirectoryFileError(f"version {doc['version']!r} is not {FORMAT_VERSION}")
    for key in ("accounts", "users"):
        if not isinstance(doc.get(key, {}), dict):
            raise DirectoryFileError(f"{key} must be an object")
    data = UserData.empty()
    for name, entry in doc.get("accounts", {}).items():
        try:
            account = _account_from_json(name, entry)
            check_account(account)
        except (DirectoryFileError, ScopeError) as e:
            raise DirectoryFileError(f"account {name!r}: {e}")
        data.accounts[name] = account
    check_bounce_domains(data.accounts)
    for username, entry in doc.get("users", {}).items():
        try:
            user, password_hash = _user_from_json(username, entry)
        except (DirectoryFileError, ScopeError) as e:
            raise DirectoryFileError(f"user {username!r}: {e}")
        check_user(user, data.accounts)
        data.users[username] = user
        data.hashes[username] = password_hash
    return data


def data_to_json(data: UserData) -> dict[str, Any]:
    users = {}
    for username, user in data.users.items():
        users[username] = user_to_json(user) | {"password_hash": data.hashes[username]}
        if user.unverified:
            users[username]["unverified"] = ";".join(sorted(user.unverified))
    return {
        "accounts": {name: account_to_json(a) for name, a in data.accounts.items()},
        "users": users,
        "version": FORMAT_VERSION,
    }


# ---- the rules every account and user obeys, in the file and in each admin change ----


def check_account(account: Account) -> None:
    if not _ACCOUNT_NAME.fullmatch(account.name):
        raise DirectoryFileError(
            f"account name {account.name!r} is not valid (letters, digits, '.', '_', '-'; "
            "at most 64, starting with a letter or digit)"
        )
    if account.notify is not None and not is_address(account.notify):
        raise DirectoryFileError(f"notify {account.notify!r} is not a valid email address")
    if account.bounce_domain is not None:
        check_bounce_domain(account)
    check_quotas(account, f"account {account.name!r}")


def check_quotas(entry: Account | SmtpUser, where: str) -> None:
    for period in ("day", "month"):
        value = getattr(entry, f"quota_{period}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise DirectoryFileError(f"{where}: quota per {period} {value!r} is not a whole "
                                     "number of 0 or more")


def check_bounce_domain(account: Account) -> None:
    """A bounce domain is a subdomain of one of the account's domains: SPF on it then
    aligns with the From: domain under DMARC's relaxed rule, and an account can only
    claim a name under a domain it owns."""
    domain = account.bounce_domain or ""
    if not is_domain(domain) or domain != domain.lower():
        raise DirectoryFileError(f"bounce domain {domain!r} is not a domain name in lower case")
    if not any(domain.endswith("." + d) for d in account.domains):
        raise DirectoryFileError(
            f"bounce domain {domain!r} is not a subdomain of an authorized domain of account "
            f"{account.name!r} (bounces.DOMAIN, for DMARC alignment)"
        )


def check_bounce_domains(accounts: Mapping[str, Account]) -> None:
    """Each bounce domain belongs to one account: its bounces are that account's."""
    owner: dict[str, str] = {}
    for name, account in sorted(accounts.items()):
        if account.bounce_domain is None:
            continue
        if account.bounce_domain in owner:
            raise EntryConflict(f"bounce domain {account.bounce_domain!r} is already the "
                                f"bounce domain of account {owner[account.bounce_domain]!r}")
        owner[account.bounce_domain] = name


def check_user(user: SmtpUser, accounts: Mapping[str, Account]) -> None:
    """Raise DirectoryFileError saying what is wrong with ``user`` (and how to fix it)."""
    name = user.username
    where = f"user {name!r}"
    if canonical_username(name) != name:
        raise DirectoryFileError(f"{where}: write the username as {canonical_username(name)!r}")
    kind = user.kind
    if kind is Kind.NAMED and not _NAMED_USERNAME.fullmatch(name):
        raise DirectoryFileError(
            f"{where}: not a domain, not an email address, and not a valid named username "
            "(1 to 255 characters, no spaces, '@' or ':')"
        )
    account = accounts.get(user.account)
    if account is None:
        raise DirectoryFileError(
            f"{where}: unknown account {user.account!r} (see mailrelay-admin account list)"
        )
    if kind is not Kind.NAMED and not user.scope.empty:
        level = "domain-level" if kind is Kind.DOMAIN else "user-level"
        raise DirectoryFileError(
            f"{where}: a {level} user's sender scope is its username; "
            "domains and addresses are only for named users"
        )
    if kind is Kind.NAMED and user.scope.empty:
        raise DirectoryFileError(
            f"{where}: a named user needs authorized domains and/or addresses "
            "(--domains 'a.com;b.com', --addresses 'x@a.com')"
        )
    outside = user.effective_scope().outside(account.domains)
    if outside:
        needed = sorted({e.rpartition("@")[2] for e in outside})
        raise DirectoryFileError(
            f"{where}: {', '.join(outside)} {'is' if len(outside) == 1 else 'are'} outside the "
            f"domains of account {account.name!r}; authorize "
            f"{'it' if len(needed) == 1 else 'them'} first: mailrelay-admin account set "
            f"{account.name} --add-domain '{';'.join(needed)}'"
        )
    if not 1 <= user.priority <= 5:
        raise DirectoryFileError(f"{where}: priority {user.priority} is outside 1..5")
    if user.rate_limit is not None and user.rate_limit < 0:
        raise DirectoryFileError(f"{where}: rate limit {user.rate_limit} is below 0")
    if user.max_connections is not None and user.max_connections < 1:
        raise DirectoryFileError(f"{where}: max connections {user.max_connections} is below 1")
    check_quotas(user, where)
    if user.bounce_notify not in ("off", "sender") and not is_address(user.bounce_notify):
        raise DirectoryFileError(
            f"{where}: bounce notify {user.bounce_notify!r} is not off, sender or an address"
        )
    stray = sorted(user.unverified - scope_entries(user))
    if stray:
        raise DirectoryFileError(f"{where}: unverified {', '.join(stray)} not in the sender scope")


# ---- reading and writing the file ----


def read_file(path: str) -> tuple[UserData, StatKey | None]:
    """The file's data and the stat it was read at; a missing file is an empty directory."""
    try:
        found = read_with_stat(path)
    except OSError as e:
        raise DirectoryFileError(f"{path}: cannot read: {e.strerror}")
    if found is None:
        return UserData.empty(), None
    raw, stat = found
    try:
        doc = json.loads(raw)
    except ValueError as e:  # also UnicodeDecodeError
        raise DirectoryFileError(f"{path}: not valid JSON: {e}")
    try:
        return data_from_json(doc), stat
    except DirectoryFileError as e:
        raise DirectoryFileError(f"{path}: {e}")


def write_file(path: str, data: UserData) -> None:
    """Replace ``path`` atomically and durably (files.save_file; mode 0600: it holds
    hashes)."""
    text = json.dumps(data_to_json(data), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    save_file(path, text.encode("utf-8"))


# ---- UserStore: synchronous changes for mailrelay-admin ----


class UserStore:
    """The user file as mailrelay-admin changes it.

    Use ``with store.change():`` around changes: it takes an exclusive lock (beside the
    file, ``<file>.lock``), reloads, and saves only when the block ends without an error,
    so two admins never lose each other's changes and a refused change writes nothing.
    Every method checks its change completely before applying it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.data = UserData.empty()

    def load(self) -> None:
        self.data = read_file(self.path)[0]

    def save(self) -> None:
        write_file(self.path, self.data)

    @contextlib.contextmanager
    def change(self) -> Iterator[UserStore]:
        with locked(self.path):
            self.load()
            yield self
            self.save()

    # -- reading --

    def user(self, username: str) -> SmtpUser:
        user = self.data.users.get(canonical_username(username))
        if user is None:
            raise UnknownEntry(f"unknown user {username!r} (see mailrelay-admin user list)")
        return user

    def account(self, name: str) -> Account:
        account = self.data.accounts.get(name)
        if account is None:
            raise UnknownEntry(f"unknown account {name!r} (see mailrelay-admin account list)")
        return account

    def password_hash(self, username: str) -> str:
        return self.data.hashes[self.user(username).username]

    def users(self, account: str | None = None) -> list[SmtpUser]:
        if account is None:
            return [u for _, u in sorted(self.data.users.items())]
        return self.data.users_of(self.account(account).name)

    def accounts(self) -> list[Account]:
        return [a for _, a in sorted(self.data.accounts.items())]

    # -- users --

    def add_user(self, user: SmtpUser, password_hash: str) -> SmtpUser:
        user = dataclasses.replace(
            user, username=canonical_username(user.username), updated=time.time()
        )
        taken = {u.casefold(): u for u in self.data.users}.get(user.username.casefold())
        if taken is not None:
            raise EntryConflict(f"user {taken!r} already exists")
        check_user(user, self.data.accounts)
        self.data.users[user.username] = user
        self.data.hashes[user.username] = password_hash
        return user

    def update_user(self, username: str, **changes: Any) -> SmtpUser:
        user = dataclasses.replace(self.user(username), **changes, updated=time.time())
        # A sender taken out of the scope is no longer waiting for confirmation; put back
        # by mailrelay-admin it is verified implicitly.
        user = dataclasses.replace(user, unverified=user.unverified & scope_entries(user))
        check_user(user, self.data.accounts)
        self.data.users[user.username] = user
        return user

    def set_password(self, username: str, password_hash: str) -> SmtpUser:
        user = self.update_user(username)  # a new `updated` stamp ends cached logins
        self.data.hashes[user.username] = password_hash
        return user

    def delete_user(self, username: str) -> SmtpUser:
        user = self.user(username)
        del self.data.users[user.username]
        del self.data.hashes[user.username]
        return user

    # -- accounts --

    def add_account(self, account: Account) -> Account:
        if account.name in self.data.accounts:
            raise EntryConflict(f"account {account.name!r} already exists")
        check_account(account)
        check_bounce_domains({**self.data.accounts, account.name: account})
        self.data.accounts[account.name] = account
        return account

    def update_account(self, name: str, **changes: Any) -> Account:
        account = dataclasses.replace(self.account(name), **changes)
        check_account(account)
        check_bounce_domains({**self.data.accounts, name: account})
        stranded = []
        for user in self.data.users_of(name):
            outside = user.effective_scope().outside(account.domains)
            if outside:
                stranded.append(f"{user.username} ({', '.join(outside)})")
        if stranded:
            raise EntryConflict(
                f"account {name!r}: domains still used by users {'; '.join(stranded)}; "
                "change or delete those users first"
            )
        self.data.accounts[name] = account
        return account

    def delete_account(self, name: str) -> Account:
        account = self.account(name)
        users = self.data.users_of(name)
        if users:
            shown = ", ".join(u.username for u in users[:5]) + (", ..." if len(users) > 5 else "")
            raise EntryConflict(
                f"account {name!r} still has {len(users)} user(s): {shown}; "
                "delete them or move them to another account (user set NAME --account ...)"
            )
        if name == DEFAULT_ACCOUNT:
            raise EntryConflict(f"account {DEFAULT_ACCOUNT!r} always exists")
        del self.data.accounts[name]
        return account


# ---- FileDirectory: the daemon's view ----


@implementer(IDirectory)
class FileDirectory:
    """IDirectory over the user file, reloaded when it changes.

    At most once per ``check_interval`` seconds of ``clock`` (default: the reactor) a call
    stats the file; a new mtime, size or inode reloads it. Reading a file of a few thousand
    users takes milliseconds, so it is done on the reactor thread; the argon2 verification
    (about 25 ms and 19 MiB each) runs in a HashingPool of ``hashing_threads`` threads
    (default: one per CPU), which bounds the memory a burst of logins can take. A file
    that cannot be read at start raises DirectoryFileError; one that breaks later is
    logged and the last good data stays in use until it is fixed.
    """

    writable = True
    stamps_every_change = True  # every change writes a new time.time() into `updated`

    def __init__(self, path: str, reactor=None, clock=None, check_interval: float = 1.0,
                 hashing_threads: int | None = None):
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self._reactor = reactor
        self.hashing = HashingPool(reactor, hashing_threads)
        self._clock = clock if clock is not None else reactor
        self._check_interval = check_interval
        self._data, self._stat = read_file(path)
        self._checked = self._clock.seconds()
        if self._stat is None:
            log.warn("No user file at {path} yet: add users with mailrelay-admin", path=path)

    def refresh(self) -> bool:
        """Reload the file now if it changed since it was last read; True if it did."""
        self._checked = self._clock.seconds()
        try:
            stat = stat_key(self.path)
        except OSError as e:
            log.error("Cannot stat {path}: {error}", path=self.path, error=e.strerror)
            return False
        if stat == self._stat:
            return False
        try:
            self._data, self._stat = read_file(self.path)
        except DirectoryFileError as e:
            self._stat = stat  # report each broken version once, not every second
            log.error("Keeping the previous users; the new user file is broken: {error}", error=e)
            return False
        log.info(
            "Loaded {path}: {users} users in {accounts} accounts",
            path=self.path,
            users=len(self._data.users),
            accounts=len(self._data.accounts),
        )
        return True

    def _current(self) -> UserData:
        if self._clock.seconds() - self._checked >= self._check_interval:
            self.refresh()
        return self._data

    def authenticate(self, username: str, password: str,
                     look_again: bool = True) -> defer.Deferred[SmtpUser]:
        """A refused login looks at the file once more before it is refused: a client that
        logs in right after ``mailrelay-admin user add`` or ``passwd`` would otherwise be
        refused until the next check (one stat, only on a failure)."""
        data = self._current()
        name = canonical_username(username)
        user = data.users.get(name)
        # An unknown user costs one verification too, so the time does not tell.
        password_hash = data.hashes[name] if user is not None else DUMMY_HASH
        d = self.hashing.run(verify_password, password_hash, password)

        def verified(ok: bool) -> SmtpUser | defer.Deferred[SmtpUser]:
            if ok and user is not None:
                return user
            if look_again and self.refresh():
                return self.authenticate(username, password, look_again=False)
            raise UnauthorizedLogin(LOGIN_FAILED)

        return d.addCallback(verified)

    def getUser(self, username: str) -> defer.Deferred[SmtpUser | None]:
        return defer.succeed(self._current().users.get(canonical_username(username)))

    def getAccount(self, name: str) -> defer.Deferred[Account | None]:
        return defer.succeed(self._current().accounts.get(name))

    def listUsers(self, account: str | None = None) -> defer.Deferred[list[SmtpUser]]:
        data = self._current()
        if account is not None:
            return defer.succeed(data.users_of(account))
        return defer.succeed([u for _, u in sorted(data.users.items())])

    def listAccounts(self) -> defer.Deferred[list[Account]]:
        return defer.succeed([a for _, a in sorted(self._current().accounts.items())])
