"""mailrelay-admin user add|passwd|set|del|list|show: SMTP users, over manage.users
(which says what a deleted user leaves behind)."""

from __future__ import annotations

import argparse
from typing import Any

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin import _password as passwords
from mailrelay.admin.cli import CommandError, Context
from mailrelay.auth.lifecycle import open_login_store
from mailrelay.auth.passwords import needs_rehash
from mailrelay.directory.changes import USER_SETTINGS, user_changes
from mailrelay.directory.filedir import DEFAULT_ACCOUNT
from mailrelay.manage.stores import NothingToChange
from mailrelay.manage.users import Forgotten, UserManager, user_json
from mailrelay.model import QUOTA_ACTIONS, Kind, SmtpUser, Status

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


_LIMITS = ("rate_limit", "max_connections", "quota_day", "quota_month")


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
    o("--quota-day", type=_limit, default=..., metavar="N",
      help="messages per UTC day (0: none), or default ([limits] quota_per_day); warnings "
           "to the account's --notify address at 80, 90 and 100%%, then 451 4.7.1")
    o("--quota-month", type=_limit, default=..., metavar="N",
      help="messages per UTC month (0: none), or default ([limits] quota_per_month)")
    o("--quota-action", choices=QUOTA_ACTIONS,
      help="over a quota: refuse (default: 451 4.7.1 at MAIL) or hold (accepted, kept in "
           "the spool's hold/ and released when the quota resets)")
    o("--archive", action=argparse.BooleanOptionalAction, help="keep an archive copy")
    o("--audit-bcc", metavar="ADDRESSES", help='copies of every message to "x@a.com;y@b.com"')
    o("--bounce-notify", metavar="WHERE", help="off, sender (default) or an address")
    o("--unsubscribe-footer", action=argparse.BooleanOptionalAction, help="add a footer")
    o("--open-tracking", action=argparse.BooleanOptionalAction, help="track opens")
    o("--click-tracking", action=argparse.BooleanOptionalAction, help="track clicks")
    o("--expires", metavar="DATE", help="no login after this day (2027-01-31, UTC) or time")
    o("--no-expires", dest="expires", action="store_const", const="", help="never expires")
    o("--allow-from", metavar="NETWORKS",
      help='log in only from these networks, "203.0.113.0/24;2001:db8::/32"')
    o("--no-allow-from", dest="allow_from", action="store_const", const="",
      help="log in from anywhere")


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
        if value is not ... and (value is not None or name in _LIMITS)
    }
    return user_changes(given, current)


def add(args: argparse.Namespace, context: Context) -> int:
    users = directory.changing(context)
    with directory.admin_errors():
        new = SmtpUser(args.username, **_changes(args, SmtpUser(args.username)))
    password, generated = passwords.new_password(args)

    async def add(users: UserManager) -> tuple[SmtpUser, Forgotten]:
        user = await users.add(new, password)
        print(f"added user {user.username} to account {user.account} ({_KIND_TEXT[user.kind]})")
        return user, await users.forget(user.username)

    user, left = directory.manage(context, add, users)
    if left.suppressions or left.stats:
        print(f"left by an earlier user {user.username}: {left.said()}")
    if generated:
        passwords.show(user.username, password)
    return 0


def passwd(args: argparse.Namespace, context: Context) -> int:
    users = directory.changing(context)

    async def find(users: UserManager) -> SmtpUser | None:
        return await users.store.getUser(args.username)

    if directory.manage(context, find, users) is None:  # "unknown user" before anything
        raise CommandError(f"unknown user {args.username!r} (see mailrelay-admin user list)")
    password, generated = passwords.new_password(args)

    async def change(users: UserManager) -> SmtpUser:
        return await users.set_password(args.username, password)

    user = directory.manage(context, change, users)
    print(f"changed the password of user {user.username}")
    if generated:
        passwords.show(user.username, password)
    return 0


def set_(args: argparse.Namespace, context: Context) -> int:
    async def change(users: UserManager) -> SmtpUser:
        try:
            _, user = await users.update(args.username, lambda current: _changes(args, current))
        except NothingToChange:
            raise CommandError("nothing to change (see mailrelay-admin user set --help)")
        return user

    user = directory.manage(context, change, directory.changing(context))
    print(f"changed user {user.username}")
    return 0


def delete(args: argparse.Namespace, context: Context) -> int:
    async def delete(users: UserManager) -> Forgotten:
        user = await users.delete(args.username)
        print(f"deleted user {user.username}")
        return await users.forget(user.username)

    forgotten = directory.manage(context, delete, directory.changing(context))
    print(f"its suppressions and statistics: {forgotten.said()}")
    return 0


# ---- reading ----


def _last_logins(context: Context) -> dict[str, tuple[float, str]]:
    """The last logins the relay recorded ([directory] logins_db, or every node's in
    [cluster] postgres); none before its first."""
    store = open_login_store(context.config.directory.logins_db, context.config)
    if store is None:
        return {}
    try:
        return store.all()
    finally:
        store.close()


def _last_text(last: tuple[float, str] | None) -> str:
    return f"{output.when(last[0])} UTC from {last[1]}" if last else "never"


def list_(args: argparse.Namespace, context: Context) -> int:
    users, accounts = directory.manage(context, lambda m: m.users(args.account))
    logins = _last_logins(context)
    if args.json:
        output.print_json([user_json(u, accounts.get(u.account), logins.get(u.username))
                           for u in users])
        return 0
    rows = [
        [
            u.username,
            str(u.kind),
            u.account,
            str(u.status),
            str(u.effective_scope(accounts.get(u.account))) or "(nothing)",
            _last_text(logins.get(u.username)),
            u.note,
        ]
        for u in users
    ]
    header = ["USERNAME", "KIND", "ACCOUNT", "STATUS", "SENDERS", "LAST LOGIN", "NOTE"]
    output.print_list(header, rows, "no users")
    return 0


def _quota(value: int | None) -> str:
    return "default" if value is None else str(value) if value else "none"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def show(args: argparse.Namespace, context: Context) -> int:
    async def find(users: UserManager):
        user, account = await users.get(args.username)
        if user is None:
            return None, None, None
        return user, account, await users.store.passwordHash(user.username)

    user, account, password_hash = directory.manage(context, find)
    if user is None:
        raise CommandError(f"unknown user {args.username!r} (see mailrelay-admin user list)")
    password = None
    if password_hash is not None:  # the file; LDAP keeps its passwords to itself
        password = (
            f"set (older hash parameters: mailrelay-admin user passwd {user.username})"
            if needs_rehash(password_hash)
            else "set (argon2id)"
        )
    last = _last_logins(context).get(user.username)
    if args.json:
        output.print_json(user_json(user, account, last))
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
        ("quota per day", _quota(user.quota_day)),
        ("quota per month", _quota(user.quota_month)),
        ("over quota", user.quota_action),
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
        ("expires", output.when(user.expires) + " UTC" if user.expires is not None else "never"),
        ("allow from", ";".join(user.allow_from) or "anywhere"),
        ("last login", _last_text(last)),
    ]
    if password is not None:
        fields.append(("password", password))
    for name, value in fields:
        print(f"{name + ':':22}{value}")
    return 0
