"""mailrelay-admin explain USER --sender ADDR: what the relay would answer at each step of a
submission and which rule decided (manage/explain.py). Exit status 0 when the message
would be accepted, 3 when refused, 1 for a mistake (an unknown user)."""

from __future__ import annotations

import argparse

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage.explain import (
    NOT_RUNNING,
    Settings,
    client_address,
    explain,
    quota_text,
    relay_limits,
)
from mailrelay.manage.users import UserManager

REFUSED = 3


def _count(text: str, least: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least {least}")
    return value


def _recipients(text: str) -> int:
    return _count(text, 1)


def _address(text: str) -> str:
    try:
        return client_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def register(subparsers) -> None:
    p = subparsers.add_parser("explain", help="what the relay would answer a user, and why")
    p.add_argument("username")
    p.add_argument("--sender", required=True, metavar="ADDR", help="the MAIL FROM address")
    p.add_argument("--from-header", metavar="ADDR",
                   help="the From: header address (default: the sender)")
    p.add_argument("--ip", type=_address,
                   help="the client's address: is it blocked after failed logins?")
    p.add_argument("--recipients", type=_recipients, default=1, metavar="N",
                   help="how many RCPT TO (default 1)")
    p.add_argument("--size", type=_count, metavar="N", help="MAIL FROM's SIZE= in bytes")
    p.add_argument("--json", action="store_true", help="print the JSON document")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, context: Context) -> int:
    config = context.config
    settings = Settings.of(config)

    async def work(users: UserManager):
        from twisted.internet import reactor

        user, account = await users.get(args.username)
        if user is None:
            return None
        return await explain(
            user, account, settings, args.sender, args.from_header, args.recipients,
            args.size,
            lambda u, a: relay_limits(reactor, config.server.control_socket, u, args.ip, a),
            args.ip,
        )

    result = directory.manage(context, work)
    if result is None:
        raise CommandError(f"unknown user {args.username!r} (see mailrelay-admin user list)")
    if args.json:
        output.print_json(result.to_json())
    else:
        output.print_table(["STEP", "REPLY", "RULE"],
                           [[s.step, s.reply, s.rule] for s in result.steps])
        if result.limits is None:
            print(NOT_RUNNING)
        else:
            print(f"rate limit: {result.limits['used_hour']} counted this hour, "
                  f"{result.limits['used_minute']} this minute")
            for quota in result.limits.get("quota", []):
                print(quota_text(quota))
    return 0 if result.accepted else REFUSED
