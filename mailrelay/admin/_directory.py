"""What the user and account commands share: the management layer over the configured
directory (manage.users), and its refusals as one line for the admin."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import TypeVar

from twisted.internet import defer

from mailrelay.admin._reactor import run
from mailrelay.admin.cli import CommandError, Context
from mailrelay.directory import shared_users
from mailrelay.directory.filedir import DirectoryFileError
from mailrelay.features.paths import feature_paths
from mailrelay.interfaces import DirectoryUnavailable, ReadOnly
from mailrelay.manage.stores import LDAP_MANAGED, DirectoryUsers, FileUserStore, at_once
from mailrelay.manage.users import UserManager, forget_account, forget_in_files, in_files
from mailrelay.scope import ScopeError

__all__ = ["LDAP_MANAGED", "admin_errors", "changing", "is_ldap", "manage", "manager"]

READ_TIMEOUT = 60.0  # seconds to wait for the directory before giving up
T = TypeVar("T")


def is_ldap(context: Context) -> bool:
    return context.config.directory.backend == "ldap"


@contextlib.contextmanager
def admin_errors(path: str = "the user file") -> Iterator[None]:
    """Refusals and file troubles become a CommandError: one line, exit status 1."""
    try:
        yield
    except (DirectoryFileError, ScopeError, ReadOnly) as e:
        raise CommandError(str(e))
    except (DirectoryUnavailable, defer.TimeoutError) as e:
        raise CommandError(f"the directory cannot answer now: {e}")
    except OSError as e:  # e.g. a full disk while saving: the old file is still there
        raise CommandError(f"{e.filename or path}: {e.strerror}")


def manager(context: Context) -> UserManager:
    """Users and accounts of the configured directory: the user file or the database of
    ``[cluster] postgres`` (read and changed in this thread), or LDAP (read-only)."""
    config = context.config
    if is_ldap(context):
        from twisted.internet import reactor

        from mailrelay.directory import open_directory

        store = DirectoryUsers(open_directory(config, reactor))
    elif (shared := shared_users(config)) is not None:
        from mailrelay.postgres.users import PgUserStore

        store = PgUserStore(shared, at_once)
    else:
        store = FileUserStore(config.directory.file, at_once)
    files = feature_paths(config)
    if config.cluster and config.cluster.postgres:  # the shared stores
        from functools import partial

        from mailrelay.admin._features import stores
        from mailrelay.features.archive import Archive
        from mailrelay.manage.users import forget_user

        kept = stores(context)  # suppressions, statistics
        forget = partial(forget_user, *kept, archive=Archive(files.archive_dir))
        return UserManager(store, at_once, forget, SimpleNamespace(seconds=time.time),
                           forget_account=partial(forget_account, *kept))
    return UserManager(store, at_once, forget_in_files(files.suppressions_db, files.stats_db,
                                                       files.archive_dir),
                       SimpleNamespace(seconds=time.time),
                       forget_account=in_files(forget_account, files.suppressions_db,
                                               files.stats_db))  # fmt: skip


def changing(context: Context) -> UserManager:
    """The manager for a change: LDAP refuses at once, before a password is asked for or
    the directory is opened."""
    if is_ldap(context):
        raise CommandError(LDAP_MANAGED)
    return manager(context)


def manage(context: Context, work: Callable[[UserManager], Awaitable[T]],
           users: UserManager | None = None) -> T:  # fmt: skip
    """``work(users)``'s result (``users``: the manager(context) by default); its refusals
    as a CommandError. LDAP needs the reactor, which runs once per process: a command asks
    LDAP only once (the user file answers without it)."""
    if users is None:
        users = manager(context)
    with admin_errors(context.config.directory.file):
        return run(lambda reactor: work(users), READ_TIMEOUT)
