"""What the API and the web page do to the relay's data, off the reactor thread.

UserWriter changes the user file through the same UserStore (lock, reload, check, atomic
save) that mailrelay-admin uses, in a thread, then has the daemon's FileDirectory re-read
it so the next read sees the change. QueueReader and QueueControl look at and act on the
spool with its blocking readers, in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailrelay.admin.queue import _entry, _recipients
from mailrelay.auth.passwords import generate_password, hash_password
from mailrelay.delivery.process import DeliveryNotRunning
from mailrelay.directory.changes import user_changes
from mailrelay.directory.filedir import UserStore
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
    --json`` (the same functions make it), read in a thread. Never opens the spool (the
    daemon's Spool service does)."""

    def __init__(self, spool, reactor) -> None:
        self.spool = spool
        self.reactor = reactor

    def _list(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        now = self.reactor.seconds()
        ids = self.spool.queued() + self.spool.held()
        shown = [_entry(self.spool, i, self.spool.read_state(i), now) for i in ids[:limit]]
        return [e[0] for e in shown if e is not None], len(ids)

    def list(self, limit: int = 500):
        """Fires with (entries, total): the first ``limit`` in delivery order, then held."""
        return in_thread(self.reactor, self._list, limit)

    def _show(self, queue_id: str) -> dict[str, Any] | None:
        state = self.spool.read_state(queue_id)
        found = _entry(self.spool, queue_id, state, self.reactor.seconds())
        if found is None:  # not queued, or delivered or deleted while we looked
            return None
        entry, snap = found
        envelope, headers = snap.envelope, snap.headers.decode("utf-8", "replace")
        return {**entry, "envelope": envelope.to_json(),
                "delivery": state.to_json() if state else None,
                "recipient_status": _recipients(envelope, state), "headers": headers}

    def show(self, queue_id: str):
        """Fires with the message's document (as ``queue show --json``), or None."""
        return in_thread(self.reactor, self._show, queue_id)


class QueueControl:
    """Retry and delete, through the delivery manager when the relay runs one.

    ``manager`` (delivery's DeliveryManager, or None when delivery is off) is asked
    ``retry(queue_id) -> bool`` (schedule an attempt now; False: not queued) and
    ``delete(queue_id) -> Deferred[str]`` (stop any attempt and remove the message; the
    place it was in; KeyError when unknown). Without a manager a delete removes the files
    as ``mailrelay-admin`` does, and a retry cannot be done.
    """

    def __init__(self, spool, reactor, manager=None) -> None:
        self.spool = spool
        self.reactor = reactor
        self.manager = manager

    @property
    def can_retry(self) -> bool:
        return self.manager is not None

    async def retry(self, queue_id: str) -> bool:
        if self.manager is None:
            raise RuntimeError("delivery is not running in this relay")
        return bool(await _maybe(self.manager.retry(queue_id)))

    async def delete(self, queue_id: str) -> str | None:
        """The place the message was removed from, or None when it was not there. While
        the delivery process restarts, the files are removed as mailrelay-admin does (the
        next process lists the queue without them)."""
        try:
            if self.manager is not None:
                try:
                    return await _maybe(self.manager.delete(queue_id))
                except DeliveryNotRunning:
                    pass
            return await in_thread(self.reactor, self.spool.delete, queue_id)
        except KeyError:
            return None


async def _maybe(value):
    """``value``, or what it fires with when it is a Deferred."""
    return await defer.maybeDeferred(lambda: value)
