"""The IUserStore implementations: the user file, and a read-only view of a directory.

FileUserStore changes the user file through directory.filedir.UserStore (a lock, a
reload, the checks, an atomic save). ``call`` runs that blocking work: in the daemon a
thread of the reactor's pool (``threaded``), in mailrelay-admin the calling thread
(``at_once``, so its Deferreds have fired when returned and no reactor runs). In the daemon
it reads through the daemon's FileDirectory (cached, keeps the last good file) and has it
re-read the file after each change, so the next read sees the change.

DirectoryUsers is any IDirectory (LDAP) for reading; every change fails with ReadOnly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, threads
from zope.interface import implementer

from mailrelay.directory.filedir import DirectoryFileError, UserStore
from mailrelay.interfaces import IUserStore, ReadOnly
from mailrelay.model import Account, SmtpUser, canonical_username
from mailrelay.verification import entries_to_verify

T = TypeVar("T")
Caller = Callable[..., defer.Deferred]

LDAP_MANAGED = "users and accounts are managed in the LDAP directory; change them there"


class NothingToChange(DirectoryFileError):
    """A change that changes nothing."""

    def __init__(self) -> None:
        super().__init__("nothing to change")


def at_once(f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
    """Run blocking ``f`` now; a fired Deferred of its result (for mailrelay-admin)."""
    return defer.maybeDeferred(f, *args)


def threaded(reactor) -> Caller:
    """Run blocking functions in ``reactor``'s thread pool (for the daemon)."""

    def call(f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return call


@implementer(IUserStore)
class FileUserStore:
    """The user file at ``path``. ``directory``: the daemon's FileDirectory, read instead
    of the file and refreshed after each change (None: read the file)."""

    writable = True

    def __init__(self, path: str, call: Caller = at_once, directory=None) -> None:
        self.path = path
        self.call = call
        self.directory = directory

    def _open(self) -> UserStore:
        return UserStore(self.path)

    def _read(self, f: Callable[[UserStore], T]) -> defer.Deferred[T]:
        def read() -> T:
            store = self._open()
            store.load()
            return f(store)

        return self.call(read)

    def _change(self, f: Callable[[UserStore], T]) -> defer.Deferred[T]:
        store = self._open()

        def locked() -> T:
            with store.change():
                return f(store)

        return self.call(locked).addBoth(self._changed, store)

    def _changed(self, result, store: UserStore):
        """After a change (``result``: its result or Failure): the directory re-reads."""
        if self.directory is not None:
            self.directory.refresh()
        return result

    # -- reading --

    def getUser(self, username: str) -> defer.Deferred[SmtpUser | None]:
        if self.directory is not None:
            return self.directory.getUser(username)
        return self._read(lambda s: s.data.users.get(canonical_username(username)))

    def getAccount(self, name: str) -> defer.Deferred[Account | None]:
        if self.directory is not None:
            return self.directory.getAccount(name)
        return self._read(lambda s: s.data.accounts.get(name))

    def listUsers(self, account: str | None = None) -> defer.Deferred[list[SmtpUser]]:
        """An unknown ``account`` errbacks with UnknownEntry (read from the file)."""
        if self.directory is not None:
            return self.directory.listUsers(account)
        return self._read(lambda s: s.users(account))

    def listAccounts(self) -> defer.Deferred[list[Account]]:
        if self.directory is not None:
            return self.directory.listAccounts()
        return self._read(lambda s: s.accounts())

    def passwordHash(self, username: str) -> defer.Deferred[str | None]:
        return self._read(lambda s: s.password_hash(username))

    # -- users --

    def addUser(self, user: SmtpUser, password_hash: str,
                verify: bool = False) -> defer.Deferred[SmtpUser]:  # fmt: skip
        def add(store: UserStore) -> SmtpUser:
            added = store.add_user(user, password_hash)
            unverified = entries_to_verify(None, added, store.users()) if verify else None
            if unverified:
                added = store.update_user(added.username, unverified=unverified)
            return added

        return self._change(add)

    def updateUser(self, username: str, change: Callable[[SmtpUser], dict[str, Any]],
                   verify: bool = False) -> defer.Deferred[tuple[SmtpUser, SmtpUser]]:  # fmt: skip
        def update(store: UserStore) -> tuple[SmtpUser, SmtpUser]:
            before = store.user(username)
            changes = change(before)
            if not changes:
                raise NothingToChange()
            after = store.update_user(before.username, **changes)
            if verify:
                unverified = entries_to_verify(before, after, store.users())
                if unverified != after.unverified:
                    after = store.update_user(after.username, unverified=unverified)
            return before, after

        return self._change(update)

    def setPassword(self, username: str, password_hash: str) -> defer.Deferred[SmtpUser]:
        return self._change(lambda store: store.set_password(username, password_hash))

    def deleteUser(self, username: str) -> defer.Deferred[SmtpUser]:
        return self._change(lambda store: store.delete_user(username))

    def confirmSender(self, username: str, entry: str) -> defer.Deferred[SmtpUser | None]:
        def confirm(store: UserStore) -> SmtpUser | None:
            user = store.data.users.get(username)
            if user is None or entry not in user.unverified:
                return None
            return store.update_user(username, unverified=user.unverified - {entry})

        return self._change(confirm)

    # -- accounts --

    def addAccount(self, account: Account) -> defer.Deferred[Account]:
        return self._change(lambda store: store.add_account(account))

    def updateAccount(self, name: str,
                      change: Callable[[Account], dict[str, Any]]) -> defer.Deferred[Account]:
        return self._change(lambda store: store.update_account(name, **change(store.account(name))))

    def deleteAccount(self, name: str) -> defer.Deferred[Account]:
        return self._change(lambda store: store.delete_account(name))


@implementer(IUserStore)
class DirectoryUsers:
    """An IDirectory (LDAP) read through IUserStore; it is changed only where it lives."""

    writable = False

    def __init__(self, directory) -> None:
        self.directory = directory

    def getUser(self, username: str):
        return self.directory.getUser(username)

    def getAccount(self, name: str):
        return self.directory.getAccount(name)

    def listUsers(self, account: str | None = None):
        return self.directory.listUsers(account)

    def listAccounts(self):
        return self.directory.listAccounts()

    def passwordHash(self, username: str) -> defer.Deferred[None]:
        return defer.succeed(None)

    def _refuse(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.fail(ReadOnly(LDAP_MANAGED))

    addUser = updateUser = setPassword = deleteUser = confirmSender = _refuse
    addAccount = updateAccount = deleteAccount = _refuse


def user_store(directory, path: str, call: Caller) -> FileUserStore | DirectoryUsers:
    """The IUserStore over ``directory`` (an IDirectory): its own store if it has one (the
    database's), the user file at ``path`` when the directory is writable, else read-only."""
    if hasattr(directory, "user_store"):
        return directory.user_store(call)
    if getattr(directory, "writable", False):
        return FileUserStore(path, call, directory)
    return DirectoryUsers(directory)
