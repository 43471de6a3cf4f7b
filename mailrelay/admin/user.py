"""mailrelay-admin user add|passwd|set|del|list|show: SMTP users.

Deleting a user deletes its suppression list and keeps its statistics as history, moved to
the name ``USER (deleted DATE TIME UTC)`` (spaces: no user can be called that), so they
still count in the account's totals. Adding a user does the same to whatever is still
stored under its name (a user deleted by editing the file, or mail of the deleted user
that was still queued): a new user never inherits a former one's suppressions or counts.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin import _password as passwords
from mailrelay.admin.cli import CommandError, Context
from mailrelay.auth.passwords import hash_password, needs_rehash
from mailrelay.directory.changes import USER_SETTINGS, user_changes
from mailrelay.directory.filedir import DEFAULT_ACCOUNT, user_to_json
from mailrelay.features.paths import feature_paths
from mailrelay.features.stats import StatsStore
from mailrelay.features.suppressions import SuppressionStore
from mailrelay.model import Account, Kind, SmtpUser, Status

_KIND_TEXT = {
    Kind.DOMAIN: "domain-level: may send from any address at its domain",
    Kind.ADDRESS: "user-level: may send only from its address",
    Kind.NAMED: "named: may send from its authorized domains and addresses",
}


def _limit(text: str) -> int | None:
    """A whole number, or ``default`` for the configured default."""
    if text.strip().lower() == "default":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'default'")


def _add_user_options(parser: argparse.ArgumentParser) -> None:
    """Options of add and set; None means "not given" (set keeps the current value)."""
    o = parser.add_argument
    o("--account", help=f"the account the user belongs to (default: {DEFAULT_ACCOUNT})")
    o("--domains", help='named users: authorized sender domains, "a.com;b.com"')
    o("--addresses", help='named users: authorized sender addresses, "x@a.com;y@b.com"')
    o("--note", help="a description")
    o("--status", choices=[s.value for s in Status], help="allowed (default), blocked, sandboxed")
    o("--rate-limit", type=_limit, default=..., metavar="N", help="messages per hour, or default")
    o("--priority", type=int, help="1 (highest) to 5; default 3")
    o("--max-connections", type=_limit, default=..., metavar="N", help="N, or default")
    o("--archive", action=argparse.BooleanOptionalAction, help="keep an archive copy")
    o("--audit-bcc", metavar="ADDRESSES", help='copies of every message to "x@a.com;y@b.com"')
    o("--bounce-notify", metavar="WHERE", help="off, sender (default) or an address")
    o("--unsubscribe-footer", action=argparse.BooleanOptionalAction, help="add a footer")
    o("--open-tracking", action=argparse.BooleanOptionalAction, help="track opens")
    o("--click-tracking", action=argparse.BooleanOptionalAction, help="track clicks")


def register(subparsers) -> None:
    parser = subparsers.add_parser("user", help="SMTP users: add, passwd, set, del, list, show")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("add", help="add a user; prints its generated password once")
    p.add_argument("username", help="a domain, an email address, or any other name")
    _add_user_options(p)
    passwords.add_option(p)
    p.set_defaults(func=add)

    p = sub.add_parser("passwd", help="give a user a new password; prints it once")
    p.add_argument("username")
    passwords.add_option(p)
    p.set_defaults(func=passwd)

    p = sub.add_parser("set", help="change a user's settings")
    p.add_argument("username")
    _add_user_options(p)
    p.set_defaults(func=set_)

    p = sub.add_parser("del", help="delete a user")
    p.add_argument("username")
    p.set_defaults(func=delete)

    p = sub.add_parser("list", help="list users")
    p.add_argument("--account", help="only this account's users")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)

    p = sub.add_parser("show", help="show one user (never its password)")
    p.add_argument("username")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=show)


# ---- changes ----


def _changes(args: argparse.Namespace, current: SmtpUser) -> dict[str, Any]:
    """The SmtpUser fields the options set; ScopeError for a bad domain or address."""
    settings = {name: getattr(args, name) for name in USER_SETTINGS}
    # None is "not given", except for the limits, where it is "default" and ... is "not given".
    given = {
        name: value
        for name, value in settings.items()
        if value is not ... and (value is not None or name in ("rate_limit", "max_connections"))
    }
    return user_changes(given, current)


def add(args: argparse.Namespace, context: Context) -> int:
    if directory.is_ldap(context):
        raise CommandError(directory.LDAP_MANAGED)
    with directory.admin_errors():
        new = SmtpUser(args.username, **_changes(args, SmtpUser(args.username)))
    password, generated = passwords.new_password(args)
    password_hash = hash_password(password)  # before the lock: hashing takes a moment
    with directory.changing(context) as store:
        user = store.add_user(new, password_hash)
    print(f"added user {user.username} to account {user.account} ({_KIND_TEXT[user.kind]})")
    left = _forget(context, user.username)
    if left.suppressions or left.stats:
        print(f"left by an earlier user {user.username}: {left.said()}")
    if generated:
        passwords.show(user.username, password)
    return 0


def passwd(args: argparse.Namespace, context: Context) -> int:
    if directory.is_ldap(context):
        raise CommandError(directory.LDAP_MANAGED)
    with directory.admin_errors():
        directory.store(context).user(args.username)  # say "unknown user" before anything else
    password, generated = passwords.new_password(args)
    password_hash = hash_password(password)
    with directory.changing(context) as store:
        user = store.set_password(args.username, password_hash)
    print(f"changed the password of user {user.username}")
    if generated:
        passwords.show(user.username, password)
    return 0


def set_(args: argparse.Namespace, context: Context) -> int:
    with directory.changing(context) as store:
        current = store.user(args.username)
        changes = _changes(args, current)
        if not changes:
            raise CommandError("nothing to change (see mailrelay-admin user set --help)")
        user = store.update_user(current.username, **changes)
    print(f"changed user {user.username}")
    return 0


def delete(args: argparse.Namespace, context: Context) -> int:
    with directory.changing(context) as store:
        user = store.delete_user(args.username)
    print(f"deleted user {user.username}")
    print(f"its suppressions and statistics: {_forget(context, user.username).said()}")
    return 0


# ---- what a user leaves behind ----


@dataclass(frozen=True)
class Forgotten:
    """What was stored under a user's name: its suppressions (removed) and its statistics
    (``stats`` counter rows, moved to ``label``)."""

    suppressions: int
    stats: int
    label: str

    def said(self) -> str:
        kept = f"statistics kept as user {self.label!r}" if self.stats else "no statistics"
        return f"{self.suppressions} suppressed address(es) removed, {kept}"


def retired_name(username: str, when: float) -> str:
    return f"{username} (deleted {datetime.fromtimestamp(when, UTC):%Y-%m-%d %H:%M:%S} UTC)"


def forget_user(suppressions, stats, username: str, when: float) -> Forgotten:
    """Remove the suppressions stored under ``username`` and move its statistics to
    retired_name (blocking: the daemon calls it in a thread)."""
    label = retired_name(username, when)
    return Forgotten(suppressions.remove_user(username), stats.retire_user(username, label),
                     label)  # fmt: skip


class _Nothing:
    """A store file that does not exist yet holds nothing (and is not made here)."""

    def remove_user(self, user: str) -> int:
        return 0

    def retire_user(self, user: str, label: str) -> int:
        return 0

    def close(self) -> None:
        pass


def _forget(context: Context, username: str) -> Forgotten:
    files = feature_paths(context.config)
    with directory.admin_errors():
        stores = [kind(path) if os.path.exists(path) else _Nothing() for kind, path in
                  ((SuppressionStore, files.suppressions_db), (StatsStore, files.stats_db))]
        try:
            return forget_user(*stores, username, time.time())
        finally:
            for store in stores:
                store.close()


# ---- reading ----


def user_json(user: SmtpUser, account: Account | None) -> dict[str, Any]:
    return {
        "username": user.username,
        "kind": str(user.kind),
        "sender_scope": str(user.effective_scope(account)),
        **user_to_json(user),
    }


def list_(args: argparse.Namespace, context: Context) -> int:
    if directory.is_ldap(context):

        def query(d):
            return d.listUsers(args.account).addCallback(
                lambda users: d.listAccounts().addCallback(lambda accounts: (users, accounts))
            )

        users, accounts = directory.read_directory(context, query)
        accounts = {a.name: a for a in accounts}
    else:
        store = directory.store(context)
        with directory.admin_errors():
            users = store.users(args.account)
        accounts = store.data.accounts
    if args.json:
        output.print_json([user_json(u, accounts.get(u.account)) for u in users])
        return 0
    rows = [
        [
            u.username,
            str(u.kind),
            u.account,
            str(u.status),
            str(u.effective_scope(accounts.get(u.account))) or "(nothing)",
            u.note,
        ]
        for u in users
    ]
    header = ["USERNAME", "KIND", "ACCOUNT", "STATUS", "SENDERS", "NOTE"]
    output.print_list(header, rows, "no users")
    return 0


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def show(args: argparse.Namespace, context: Context) -> int:
    password = None
    if directory.is_ldap(context):

        def query(d):
            def with_account(user):
                if user is None:
                    return None, None
                return d.getAccount(user.account).addCallback(lambda a: (user, a))

            return d.getUser(args.username).addCallback(with_account)

        user, account = directory.read_directory(context, query)
        if user is None:
            raise CommandError(f"unknown user {args.username!r} (see mailrelay-admin user list)")
    else:
        store = directory.store(context)
        with directory.admin_errors():
            user = store.user(args.username)
        account = store.data.accounts.get(user.account)
        stale = needs_rehash(store.password_hash(user.username))
        password = (
            f"set (older hash parameters: mailrelay-admin user passwd {user.username})"
            if stale
            else "set (argon2id)"
        )
    if args.json:
        output.print_json(user_json(user, account))
        return 0
    updated = output.when(user.updated) + " UTC" if user.updated else "-"
    fields = [
        ("username", user.username),
        ("kind", _KIND_TEXT[user.kind]),
        ("account", user.account),
        ("status", str(user.status)),
        ("senders", str(user.effective_scope(account)) or "(nothing)"),
        ("authorized domains", user.scope.domains_text() or "-"),
        ("authorized addresses", user.scope.addresses_text() or "-"),
        ("note", user.note or "-"),
        ("rate limit", "default" if user.rate_limit is None else f"{user.rate_limit}/hour"),
        ("priority", str(user.priority)),
        (
            "max connections",
            "default" if user.max_connections is None else str(user.max_connections),
        ),
        ("archive", _yes(user.archive)),
        ("audit bcc", ";".join(user.audit_bcc) or "-"),
        ("bounce notify", user.bounce_notify),
        ("unsubscribe footer", _yes(user.unsubscribe_footer)),
        ("open tracking", _yes(user.open_tracking)),
        ("click tracking", _yes(user.click_tracking)),
        ("updated", updated),
    ]
    if password is not None:
        fields.append(("password", password))
    for name, value in fields:
        print(f"{name + ':':22}{value}")
    return 0
