"""What the API and the web page do to the relay's data, off the reactor thread.

UserWriter changes the user file through the same UserStore (lock, reload, check, atomic
save) that mailrelay-admin uses, in a thread, then has the daemon's FileDirectory re-read
it so the next read sees the change. QueueReader looks at the spool with manage.queue's
blocking readers, in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.logger import Logger

from mailrelay.auth.passwords import generate_password, hash_password
from mailrelay.directory.changes import user_changes
from mailrelay.directory.filedir import UserStore
from mailrelay.manage import queue as manage_queue
from mailrelay.model import Account, SmtpUser
from mailrelay.verification import entries_to_verify

log = Logger()
T = TypeVar("T")


def in_thread(reactor, f: Callable[..., T], *args: Any, **kwargs: Any):
    """Run blocking ``f`` in the reactor's thread pool; a Deferred of its result."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)


class UserWriter:
    """Changes to the user file for the panel. ``directory`` is the daemon's
    FileDirectory (refreshed after each change); ``verify`` marks senders the panel adds
    as waiting for confirmation."""

    def __init__(self, path: str, directory, reactor, verify: bool) -> None:
        self.path = path
        self.directory = directory
        self.reactor = reactor
        self.verify = verify

    async def _change(self, f: Callable[[UserStore], T]) -> T:
        def locked() -> T:
            store = UserStore(self.path)
            with store.change():
                return f(store)

        try:
            return await in_thread(self.reactor, locked)
        finally:
            refresh = getattr(self.directory, "refresh", None)
            if refresh is not None:
                refresh()

    def _unverified(self, store: UserStore, before: SmtpUser | None, after: SmtpUser):
        if not self.verify:
            return after.unverified
        return entries_to_verify(before, after, store.users())

    async def add_user(self, username: str, settings: dict[str, Any]) -> tuple[SmtpUser, str]:
        """Add a user with a generated password; returns the user and the password."""
        password = generate_password()
        password_hash = await in_thread(self.reactor, hash_password, password)

        def add(store: UserStore) -> SmtpUser:
            new = SmtpUser(username, **user_changes(settings, SmtpUser(username)))
            user = store.add_user(new, password_hash)
            unverified = self._unverified(store, None, user)
            if unverified:
                user = store.update_user(user.username, unverified=unverified)
            return user

        return await self._change(add), password

    async def update_user(self, username: str, settings: dict[str, Any]) -> SmtpUser:
        def update(store: UserStore) -> SmtpUser:
            before = store.user(username)
            after = store.update_user(before.username, **user_changes(settings, before))
            unverified = self._unverified(store, before, after)
            if unverified != after.unverified:
                after = store.update_user(after.username, unverified=unverified)
            return after

        return await self._change(update)

    async def reset_password(self, username: str) -> tuple[SmtpUser, str]:
        password = generate_password()
        password_hash = await in_thread(self.reactor, hash_password, password)
        user = await self._change(lambda store: store.set_password(username, password_hash))
        return user, password

    async def delete_user(self, username: str) -> SmtpUser:
        return await self._change(lambda store: store.delete_user(username))

    async def confirm(self, username: str, entry: str) -> SmtpUser | None:
        """Mark ``entry`` verified for ``username``; None when that user or entry no longer
        waits (deleted, or the sender was taken out of its scope)."""

        def confirm(store: UserStore) -> SmtpUser | None:
            user = store.data.users.get(username)
            if user is None or entry not in user.unverified:
                return None
            return store.update_user(username, unverified=user.unverified - {entry})

        return await self._change(confirm)

    async def add_account(self, account: Account) -> Account:
        return await self._change(lambda store: store.add_account(account))

    async def update_account(self, name: str, changes: dict[str, Any]) -> Account:
        return await self._change(lambda store: store.update_account(name, **changes))

    async def delete_account(self, name: str) -> Account:
        return await self._change(lambda store: store.delete_account(name))


class QueueReader:
    """The spool as the panel shows it, in the JSON of ``mailrelay-admin queue list|show
    --json`` (manage.queue makes both), read in a thread. Never opens the spool (the
    daemon's Spool service does)."""

    def __init__(self, spool, reactor) -> None:
        self.spool = spool
        self.reactor = reactor

    def list(self, limit: int = 500):
        """Fires with (entries, total): the first ``limit`` in delivery order, then held."""
        return in_thread(self.reactor, manage_queue.entries, self.spool,
                         self.reactor.seconds(), limit)

    def show(self, queue_id: str):
        """Fires with the message's document (as ``queue show --json``), or None."""
        return in_thread(self.reactor, manage_queue.document, self.spool, queue_id,
                         self.reactor.seconds())


