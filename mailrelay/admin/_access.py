"""What the apikey and admin commands share: the access file, its errors as one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage.access import AccessError, AccessStore, access_path


def store(context: Context) -> AccessStore:
    """The access file, loaded (for reading)."""
    s = AccessStore(access_path(context.config))
    try:
        s.load()
    except AccessError as e:
        raise CommandError(str(e))
    return s


@contextlib.contextmanager
def changing(context: Context) -> Iterator[AccessStore]:
    """Lock, load, change, save; errors become one line for the admin."""
    s = AccessStore(access_path(context.config))
    try:
        with s.change():
            yield s
    except AccessError as e:
        raise CommandError(str(e))
    except OSError as e:
        raise CommandError(f"{e.filename or s.path}: {e.strerror}")
