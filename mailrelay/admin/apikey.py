"""mailrelay-admin apikey add|list|del: API keys for the management API (/api/v1).

A key is printed once, when it is made; only its SHA-256 is stored. Read-only keys may
only read; writes get 403.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

from mailrelay.admin import _directory as directory
from mailrelay.admin.cli import CommandError, Context
from mailrelay.web.access import Access, AccessError, AccessStore, access_path


def register(subparsers) -> None:
    parser = subparsers.add_parser("apikey", help="management API keys: add, list, del")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("add", help="make a key; prints it once")
    p.add_argument("name", help="what the key is for, e.g. deploy or monitoring")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--read-only", dest="access", action="store_const",
                      const=Access.READ_ONLY, help="may only read (GET)")
    mode.add_argument("--read-write", dest="access", action="store_const",
                      const=Access.READ_WRITE, help="may read and change")
    p.set_defaults(func=add)

    p = sub.add_parser("list", help="list keys (never the keys themselves)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)

    p = sub.add_parser("del", help="revoke a key")
    p.add_argument("name")
    p.set_defaults(func=delete)


def store(context: Context) -> AccessStore:
    return AccessStore(access_path(context.config))


@contextlib.contextmanager
def changing(context: Context) -> Iterator[AccessStore]:
    """Lock, load, change, save; errors become one line for the admin."""
    s = store(context)
    try:
        with s.change():
            yield s
    except AccessError as e:
        raise CommandError(str(e))
    except OSError as e:
        raise CommandError(f"{e.filename or s.path}: {e.strerror}")


def add(args: argparse.Namespace, context: Context) -> int:
    with changing(context) as s:
        secret = s.add_key(args.name, args.access)
    print(f"added API key {args.name} ({args.access}):")
    print(secret)
    print("(shown only this once: only a hash of it is stored; send it as "
          "'Authorization: Bearer KEY')", file=sys.stderr)
    return 0


def list_(args: argparse.Namespace, context: Context) -> int:
    s = store(context)
    try:
        s.load()
    except AccessError as e:
        raise CommandError(str(e))
    keys = sorted(s.data.api_keys.values(), key=lambda k: k.name)
    if args.json:
        directory.print_json(
            [{"name": k.name, "access": str(k.access), "created": k.created} for k in keys]
        )
        return 0
    if not keys:
        print("no API keys", file=sys.stderr)
        return 0
    rows = [
        [k.name, str(k.access),
         datetime.fromtimestamp(k.created, UTC).strftime("%Y-%m-%d %H:%M:%S")]
        for k in keys
    ]  # fmt: skip
    directory.print_table(["NAME", "ACCESS", "CREATED (UTC)"], rows)
    return 0


def delete(args: argparse.Namespace, context: Context) -> int:
    with changing(context) as s:
        s.delete_key(args.name)
    print(f"deleted API key {args.name}")
    return 0
