"""What the user and account commands share: the user file, the configured directory when
it is LDAP, and turning their errors into one line for the admin."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from mailrelay.admin.cli import CommandError, Context
from mailrelay.directory.filedir import DirectoryFileError, UserStore
from mailrelay.interfaces import DirectoryUnavailable
from mailrelay.scope import ScopeError

LDAP_MANAGED = "users and accounts are managed in the LDAP directory; change them there"
READ_TIMEOUT = 60.0  # seconds to wait for the directory before giving up


def is_ldap(context: Context) -> bool:
    return context.config.directory.backend == "ldap"


@contextlib.contextmanager
def admin_errors(path: str = "the user file") -> Iterator[None]:
    """Refusals and file troubles become a CommandError: one line, exit status 1."""
    try:
        yield
    except (DirectoryFileError, ScopeError) as e:
        raise CommandError(str(e))
    except OSError as e:  # e.g. a full disk while saving: the old file is still there
        raise CommandError(f"{e.filename or path}: {e.strerror}")


def store(context: Context) -> UserStore:
    """The user file, loaded (for reading)."""
    user_store = UserStore(context.config.directory.file)
    with admin_errors(user_store.path):
        user_store.load()
    return user_store


@contextlib.contextmanager
def changing(context: Context) -> Iterator[UserStore]:
    """Lock, load, change, save: nothing is written when the block raises."""
    if is_ldap(context):
        raise CommandError(LDAP_MANAGED)
    user_store = UserStore(context.config.directory.file)
    with admin_errors(user_store.path), user_store.change():
        yield user_store


def read_directory(context: Context, query: Callable[[Any], defer.Deferred]) -> Any:
    """Run ``query(directory)`` against the configured (LDAP) directory and wait for it.

    mailrelay-admin is a short-lived process, so it runs the reactor just for this.
    """
    from twisted.internet import reactor

    from mailrelay.directory import open_directory

    outcome: list[Any] = []

    def start() -> None:
        d = defer.maybeDeferred(lambda: query(open_directory(context.config, reactor)))
        d.addTimeout(READ_TIMEOUT, reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(DirectoryUnavailable, defer.TimeoutError):
            raise CommandError(f"the directory cannot answer now: {result.getErrorMessage()}")
        result.raiseException()
    return result
