"""What the apikey and admin commands share: the access file (manage.access), or with
``[cluster] postgres`` the database's tables (postgres/access.py), its errors as one line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from mailrelay.admin._reactor import run
from mailrelay.admin.cli import CommandError, Context
from mailrelay.interfaces import IAccessStore
from mailrelay.manage.access import AccessError, FileAccessStore, access_path
from mailrelay.manage.stores import at_once

T = TypeVar("T")


def known_account(context: Context, name: str | None) -> None:
    """Refuse to limit an admin or a key to an account the user file does not have (a
    typo would make a login that sees nothing). LDAP's accounts are not asked: the
    reactor runs once per process, and the access file is changed after this."""
    from mailrelay.admin import _directory as directory

    if name is None or directory.is_ldap(context):
        return
    if directory.manage(context, lambda users: users.store.getAccount(name)) is None:
        raise CommandError(f"unknown account {name!r} (see mailrelay-admin account list)")


def access(context: Context, work: Callable[[IAccessStore], Awaitable[T]]) -> T:
    """``work(store)``'s result, the access file read (or locked, changed and saved) in
    this thread; refusals and file troubles become a CommandError."""
    from mailrelay.postgres.db import UNAVAILABLE, of_config  # psycopg: only here
    from mailrelay.postgres.unavailable import Unavailable

    try:
        db = of_config(context.config)
        if db is not None:  # [cluster] postgres
            from mailrelay.postgres.access import PgAccessStore

            store = PgAccessStore(db, at_once)
        else:
            store = FileAccessStore(access_path(context.config), at_once)
        return run(lambda reactor: work(store))
    except (AccessError, Unavailable) as e:
        raise CommandError(str(e))
    except OSError as e:
        raise CommandError(f"{e.filename or access_path(context.config)}: {e.strerror}")
    except UNAVAILABLE as e:  # at connecting
        raise CommandError(str(Unavailable(e)))
