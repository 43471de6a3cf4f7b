"""Users and accounts in PostgreSQL: the writable directory shared by the nodes.

With ``[cluster] postgres`` set (and ``[directory] backend = file``, the default) the users
and accounts live in the database instead of the user file. The rules are the file's:
a change runs directory.filedir.UserStore's methods on the whole directory, loaded inside
a transaction that holds the one row of ``mailrelay_users_state`` FOR UPDATE (so changes
from any node are serialised as the file's lock serialises them), and writes back only
the entries that differ, as JSON documents in the file's form (new fields need no
migration) beside the columns that are queried (the account of a user).

Each node's PgDirectory keeps every user and account in memory, loaded at start: logins,
scopes and policy never wait for the database, and keep working while it is away. A
change announces the names it touched on ``mailrelay_users`` when it commits; every node
re-reads those entries (one reload at a time, in order, so an older read never overwrites
a newer one). An empty payload, or the listener's None after it lost its connection,
reloads everything; a cheap poll of the change counter every ``poll`` seconds reloads
everything if a notification was missed all the same.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import psycopg
from psycopg.types.json import Jsonb
from twisted.application.service import MultiService
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.auth.hashing import HashingPool
from mailrelay.auth.passwords import DUMMY_HASH, LOGIN_FAILED, verify_password
from mailrelay.directory.filedir import (
    DEFAULT_ACCOUNT,
    DirectoryFileError,
    UserData,
    UserStore,
    check_user,
    data_from_json,
    data_to_json,
)
from mailrelay.interfaces import DirectoryUnavailable, IDirectory
from mailrelay.manage.stores import Caller, FileUserStore, at_once
from mailrelay.model import Account, SmtpUser, canonical_username
from mailrelay.postgres.db import UNAVAILABLE, Listener, PgStore, notify

log = Logger()

CHANNEL = "mailrelay_users"
MAX_PAYLOAD = 7000  # PostgreSQL's limit is 8000 bytes; more names: "reload everything"
WHERE = "the user database"  # in refusals, where the file store names its file


def _unavailable(e: Exception) -> DirectoryUnavailable:
    return DirectoryUnavailable(f"PostgreSQL: {str(e).strip() or type(e).__name__}")


class PgUsers(PgStore):
    """The tables, and reading them whole or in part (blocking: call from a thread)."""

    COMPONENT = "users"
    MIGRATIONS = {1: """
    CREATE TABLE mailrelay_accounts (
        name TEXT PRIMARY KEY,
        doc JSONB NOT NULL
    );
    CREATE TABLE mailrelay_users (
        username TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        doc JSONB NOT NULL
    );
    CREATE INDEX mailrelay_users_account ON mailrelay_users (account);
    CREATE TABLE mailrelay_users_state (
        one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        generation BIGINT NOT NULL
    );
    INSERT INTO mailrelay_users_state (one, generation) VALUES (TRUE, 0);
    """}

    def generation(self, conn: psycopg.Connection, lock: bool = False) -> int:
        return conn.execute("SELECT generation FROM mailrelay_users_state"
                            + (" FOR UPDATE" if lock else "")).fetchone()[0]

    def read_all(self, conn: psycopg.Connection) -> tuple[UserData, set[str]]:
        """Everything, checked as a user file is; and the accounts that have a row (the
        default account exists without one)."""
        accounts = dict(conn.execute("SELECT name, doc FROM mailrelay_accounts").fetchall())
        users = {name: doc | {"password_hash": password_hash} for name, password_hash, doc
                 in conn.execute("SELECT username, password_hash, doc FROM mailrelay_users")}
        try:
            return data_from_json({"accounts": accounts, "users": users}), set(accounts)
        except DirectoryFileError as e:
            raise DirectoryFileError(f"{WHERE}: {e}")

    def read_some(self, conn: psycopg.Connection, users: list[str], accounts: list[str]
                  ) -> tuple[dict[str, tuple[SmtpUser, str] | None], dict[str, Account | None]]:
        """The named entries as they are now (None: gone), checked as the file's are (the
        users against the accounts as they are now)."""
        docs = dict(conn.execute("SELECT name, doc FROM mailrelay_accounts").fetchall())
        rows = {name: doc | {"password_hash": password_hash} for name, password_hash, doc
                in conn.execute("SELECT username, password_hash, doc FROM mailrelay_users "
                                "WHERE username = ANY(%s)", (users,))}
        try:
            data = data_from_json({"accounts": docs, "users": rows})
        except DirectoryFileError as e:
            raise DirectoryFileError(f"{WHERE}: {e}")
        found_users = {name: (data.users[name], data.hashes[name]) if name in data.users
                       else None for name in users}
        return found_users, {name: data.accounts.get(name) for name in accounts}

    def write(self, conn: psycopg.Connection, before: UserData,
              after: UserData) -> tuple[list[str], list[str]]:  # fmt: skip
        """Write the entries of ``after`` that differ from ``before``; their names. (The
        default account, always there, has a row once it differs from an empty one.)"""
        old, new = data_to_json(before), data_to_json(after)
        accounts = sorted(name for name in old["accounts"].keys() | new["accounts"].keys()
                          if old["accounts"].get(name) != new["accounts"].get(name))
        users = sorted(name for name in old["users"].keys() | new["users"].keys()
                       if old["users"].get(name) != new["users"].get(name))
        for name in accounts:
            doc = new["accounts"].get(name)
            if doc is None:
                conn.execute("DELETE FROM mailrelay_accounts WHERE name = %s", (name,))
            else:
                conn.execute("INSERT INTO mailrelay_accounts (name, doc) VALUES (%s, %s) "
                             "ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc",
                             (name, Jsonb(doc)))
        for name in users:
            doc = new["users"].get(name)
            if doc is None:
                conn.execute("DELETE FROM mailrelay_users WHERE username = %s", (name,))
                continue
            doc = dict(doc)
            password_hash = doc.pop("password_hash")
            conn.execute(
                "INSERT INTO mailrelay_users (username, account, password_hash, doc) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (username) DO UPDATE SET "
                "account = EXCLUDED.account, password_hash = EXCLUDED.password_hash, "
                "doc = EXCLUDED.doc",
                (name, doc["account"], password_hash, Jsonb(doc)))
        if users or accounts:
            generation = conn.execute("UPDATE mailrelay_users_state SET generation = "
                                      "generation + 1 RETURNING generation").fetchone()[0]
            payload = json.dumps({"generation": generation, "users": users,
                                  "accounts": accounts})
            notify(conn, CHANNEL, payload if len(payload.encode()) <= MAX_PAYLOAD else "")
        return users, accounts


class PgUserData(UserStore):
    """directory.filedir.UserStore over the database: ``load`` reads everything, ``with
    change():`` holds the change lock, reads everything, and writes what the block changed
    when it ends without an error (its names in ``changed`` afterwards)."""

    def __init__(self, users: PgUsers) -> None:
        super().__init__(WHERE)
        self.users_db = users
        self.stored_accounts: set[str] = set()
        self.changed: tuple[list[str], list[str]] = ([], [])

    def load(self) -> None:
        try:
            with self.users_db.db.transaction() as conn:
                self.data, self.stored_accounts = self.users_db.read_all(conn)
        except UNAVAILABLE as e:
            raise _unavailable(e)

    def save(self) -> None:
        raise NotImplementedError("the database is written by change()")

    @contextlib.contextmanager
    def change(self) -> Iterator[PgUserData]:
        try:
            with self.users_db.db.transaction() as conn:
                self.users_db.generation(conn, lock=True)
                before, self.stored_accounts = self.users_db.read_all(conn)
                self.data = UserData(dict(before.accounts), dict(before.users),
                                     dict(before.hashes))
                yield self
                self.changed = self.users_db.write(conn, before, self.data)
        except UNAVAILABLE as e:
            raise _unavailable(e)


class PgUserStore(FileUserStore):
    """IUserStore over the database: the file store's methods, on PgUserData. In the daemon
    ``directory`` (its PgDirectory) answers the reads and re-reads each change before the
    change's Deferred fires, so the next read on this node sees it."""

    def __init__(self, users: PgUsers, call: Caller = at_once, directory=None) -> None:
        super().__init__(WHERE, call, directory)
        self.users_db = users

    def _open(self) -> PgUserData:
        return PgUserData(self.users_db)

    def _changed(self, result, store: PgUserData):
        if self.directory is None or not any(store.changed):
            return result
        return self.directory.reload(*store.changed).addBoth(lambda _: result)


def import_data(users: PgUsers, data: UserData) -> dict[str, int]:
    """Add the accounts and users of ``data`` (a user file's) that the database does not
    have; those it has are left as they are there. All or nothing: a user that does not
    fit the accounts as they are in the database refuses the whole import. Counts."""
    store = PgUserData(users)
    counts = dict.fromkeys(("accounts", "users", "accounts_kept", "users_kept"), 0)
    with store.change():
        current = store.data
        for name, account in sorted(data.accounts.items()):
            if name in store.stored_accounts or (name == DEFAULT_ACCOUNT and
                                                  account == current.accounts.get(name)):
                counts["accounts_kept"] += name in store.stored_accounts
                continue
            current.accounts[name] = account
            counts["accounts"] += 1
        taken = {u.casefold() for u in current.users}
        for name, user in sorted(data.users.items()):
            if name.casefold() in taken:
                counts["users_kept"] += 1
                continue
            check_user(user, current.accounts)
            current.users[name] = user
            current.hashes[name] = data.hashes[name]
            counts["users"] += 1
    return counts


@implementer(IDirectory)
class PgDirectory(MultiService):
    """IDirectory over the database, every user and account in memory (see the module's
    text). A service: its listener and poll run while it runs. The argon2 checks run in a
    HashingPool, as the file directory's do."""

    writable = True
    stamps_every_change = True  # UserStore stamps `updated` with each change, as in the file

    def __init__(self, users: PgUsers, reactor, poll: float = 10.0,
                 hashing_threads: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.users_db = users
        self.reactor = reactor
        self.hashing = HashingPool(reactor, hashing_threads)
        self.poll = poll
        self._lock = defer.DeferredLock()  # one reload at a time, in the order asked
        self._data, self._generation = self._read_all()
        log.info("Loaded the users from PostgreSQL: {users} users in {accounts} accounts",
                 users=len(self._data.users), accounts=len(self._data.accounts))
        self.listener = Listener(users.db, [CHANNEL], self._received, reactor)
        self.listener.setServiceParent(self)
        self._loop: task.LoopingCall | None = None

    # -- keeping up --

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = self.reactor
        self._loop.start(self.poll, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _read_all(self) -> tuple[UserData, int]:
        with self.users_db.db.transaction() as conn:
            generation = self.users_db.generation(conn)  # first: the data is as new or newer
            return self.users_db.read_all(conn)[0], generation

    def _received(self, channel: str, payload: str | None) -> defer.Deferred:
        try:
            names = json.loads(payload) if payload else None
            users, accounts = list(names["users"]), list(names["accounts"])
        except (ValueError, TypeError, KeyError):
            return self.reload_all()
        return self.reload(users, accounts)

    def _in_thread(self, f, *args) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _serially(self, read, apply) -> defer.Deferred:
        """``read()`` in a thread, then ``apply(its result)``; one at a time, so that what
        is applied is never older than what was applied before. Failures are logged: the
        poll or the next notification tries again."""

        def run():
            return self._in_thread(read).addCallback(apply)

        def failed(failure):
            if failure.check(*UNAVAILABLE, DirectoryFileError):
                log.warn("Users not re-read from PostgreSQL ({error}); keeping those in "
                         "memory", error=str(failure.value).strip())
            else:
                log.failure("Users not re-read from PostgreSQL; keeping those in memory",
                            failure)

        return self._lock.run(run).addErrback(failed)

    def reload_all(self) -> defer.Deferred:
        def apply(found: tuple[UserData, int]) -> None:
            self._data, self._generation = found

        return self._serially(self._read_all, apply)

    def reload(self, users: list[str], accounts: list[str]) -> defer.Deferred:
        """Re-read the named users and accounts (a change made them differ)."""

        def read():
            with self.users_db.db.transaction() as conn:
                generation = self.users_db.generation(conn)
                return self.users_db.read_some(conn, users, accounts), generation

        def apply(found) -> None:
            (found_users, found_accounts), generation = found
            data = UserData(dict(self._data.accounts), dict(self._data.users),
                            dict(self._data.hashes))
            for name, account in found_accounts.items():
                if account is not None:
                    data.accounts[name] = account
                else:
                    data.accounts.pop(name, None)
            for name, entry in found_users.items():
                if entry is None:
                    data.users.pop(name, None)
                    data.hashes.pop(name, None)
                else:
                    data.users[name], data.hashes[name] = entry
            self._data, self._generation = data, max(generation, self._generation)

        return self._serially(read, apply)

    def _check(self) -> defer.Deferred:
        """The safety poll: everything again if the change counter moved unannounced."""

        def read():
            with self.users_db.db.transaction() as conn:
                return self.users_db.generation(conn)

        def compare(generation: int):
            if generation != self._generation:
                log.info("Users changed without a notification; reloading them all")
                return self.reload_all()
            return None

        def failed(failure):  # the listener logs the database's absence
            if not failure.check(*UNAVAILABLE):
                log.failure("Cannot compare the users' change counter", failure)

        return self._in_thread(read).addCallbacks(compare, failed)

    # -- IDirectory --

    def authenticate(self, username: str, password: str) -> defer.Deferred[SmtpUser]:
        name = canonical_username(username)
        user = self._data.users.get(name)
        # An unknown user costs one verification too, so the time does not tell.
        password_hash = self._data.hashes[name] if user is not None else DUMMY_HASH
        d = self.hashing.run(verify_password, password_hash, password)

        def verified(ok: bool) -> SmtpUser:
            if ok and user is not None:
                return user
            raise UnauthorizedLogin(LOGIN_FAILED)

        return d.addCallback(verified)

    def getUser(self, username: str) -> defer.Deferred[SmtpUser | None]:
        return defer.succeed(self._data.users.get(canonical_username(username)))

    def getAccount(self, name: str) -> defer.Deferred[Account | None]:
        return defer.succeed(self._data.accounts.get(name))

    def listUsers(self, account: str | None = None) -> defer.Deferred[list[SmtpUser]]:
        if account is not None:
            return defer.succeed(self._data.users_of(account))
        return defer.succeed([u for _, u in sorted(self._data.users.items())])

    def listAccounts(self) -> defer.Deferred[list[Account]]:
        return defer.succeed([a for _, a in sorted(self._data.accounts.items())])

    def user_store(self, call: Caller) -> PgUserStore:
        return PgUserStore(self.users_db, call, self)

