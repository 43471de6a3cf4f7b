"""mailrelay-admin webhook add|list|del|rotate-secret|enable|failed|retry: the accounts'
webhook endpoints and the events that could not be sent to them.

``add`` prints the endpoint's secret (``whsec_...``): the receiver verifies the
signatures with it. ``rotate-secret`` makes a new one; requests are signed with the old
one too for ``[webhooks] secret_overlap``. An endpoint that answered 410 Gone is disabled
until ``enable``; ``failed`` lists the events given up on, ``retry`` sends them again (the
running relay picks them up within ``[webhooks] poll_interval``). ``--account`` limits
every command to one account's endpoints.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from mailrelay.admin import _directory as directory
from mailrelay.admin import _output as output
from mailrelay.admin._reactor import run
from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage.stores import at_once
from mailrelay.manage.webhooks import KINDS, Webhooks, endpoint_json, failed_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("webhook", help="webhook endpoints and failed events")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("add", help="add an endpoint to an account; prints its secret")
    p.add_argument("account")
    p.add_argument("url", help="http:// or https:// URL the events are POSTed to")
    p.add_argument("--user", dest="users", action="append", default=[], metavar="USER",
                   help="only this SMTP user's events (repeat for more; default: all)")
    p.add_argument("--event", dest="kinds", action="append", default=[], metavar="KIND",
                   choices=KINDS, help="only this kind of event (repeat; default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=add)

    p = sub.add_parser("list", help="list endpoints")
    _account(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)

    for name, func, text in (("del", delete, "delete an endpoint and its events"),
                             ("rotate-secret", rotate, "a new secret; the old one signs "
                              "for [webhooks] secret_overlap more"),
                             ("enable", enable, "send to a disabled endpoint again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("endpoint", type=int, metavar="ID")
        _account(p)
        if func is rotate:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)

    p = sub.add_parser("failed", help="events that could not be sent")
    _account(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=failed)

    p = sub.add_parser("retry", help="send failed events again")
    p.add_argument("ids", nargs="*", type=int, metavar="ID", help="failed events (webhook "
                   "failed)")
    p.add_argument("--endpoint", type=int, help="every failed event of this endpoint")
    p.add_argument("--all", action="store_true", help="every failed event")
    _account(p)
    p.set_defaults(func=retry)


def _account(parser) -> None:
    parser.add_argument("--account", help="only this account's endpoints")


@contextlib.contextmanager
def _opened(context: Context) -> Iterator[Webhooks]:
    from mailrelay.service import StartupError, open_webhooks

    w = context.config.webhooks
    try:
        store = open_webhooks(context.config)
    except StartupError as e:
        raise CommandError(str(e))
    try:
        yield Webhooks(store, at_once, w.allow_private, w.secret_overlap)
    finally:
        store.close()


def _now(d):
    return run(lambda reactor: d)


def add(args, context: Context) -> int:
    async def exists(users):
        return await users.store.getAccount(args.account)

    if directory.manage(context, exists) is None:
        raise CommandError(f"unknown account {args.account!r} (see mailrelay-admin account "
                           "list)")
    with _opened(context) as hooks:
        try:
            endpoint = _now(hooks.add(args.account, args.url, args.users, args.kinds))
        except ValueError as e:
            raise CommandError(str(e))
    doc = endpoint_json(endpoint, secrets=True)
    if args.json:
        output.print_json(doc)
    else:
        print(f"endpoint {endpoint.id} for {endpoint.account}: {endpoint.url}")
        print(f"secret: {doc['secrets'][0]}")
    return 0


def _events(e) -> str:
    return ", ".join(e.kinds) or "all"


def list_(args, context: Context) -> int:
    with _opened(context) as hooks:
        endpoints = _now(hooks.list(args.account))
    if args.json:
        output.print_json([endpoint_json(e) for e in endpoints])
        return 0
    rows = [[str(e.id), e.account, e.url, ", ".join(e.users) or "all", _events(e),
             "enabled" if e.enabled else f"disabled: {e.disabled_reason}"]
            for e in endpoints]  # fmt: skip
    output.print_list(["ID", "ACCOUNT", "URL", "USERS", "EVENTS", "STATE"], rows,
                      "no webhook endpoints")
    return 0


def _missing(args) -> CommandError:
    where = f" of account {args.account}" if args.account else ""
    return CommandError(f"no webhook endpoint {args.endpoint}{where}")


def _change(args, context: Context, change) -> int:
    with _opened(context) as hooks:
        if not _now(change(hooks)(args.endpoint, args.account)):
            raise _missing(args)
    return 0


def delete(args, context: Context) -> int:
    return _change(args, context, lambda hooks: hooks.remove)


def rotate(args, context: Context) -> int:
    with _opened(context) as hooks:
        endpoint = _now(hooks.rotateSecret(args.endpoint, args.account))
    if endpoint is None:
        raise _missing(args)
    doc = endpoint_json(endpoint, secrets=True)
    if args.json:
        output.print_json(doc)
    else:
        print(f"new secret: {doc['secrets'][0]}")
        for old in doc["secrets"][1:]:
            print(f"still signing until the overlap ends: {old}")
    return 0


def enable(args, context: Context) -> int:
    return _change(args, context, lambda hooks: hooks.enable)


def failed(args, context: Context) -> int:
    with _opened(context) as hooks:
        rows = _now(hooks.failed(args.account))
    if args.json:
        output.print_json([failed_json(d) for d in rows])
        return 0
    table = [[str(d.id), d.account, str(d.endpoint), d.kind, output.when(d.created),
              str(d.attempts), d.last_error] for d in rows]  # fmt: skip
    output.print_list(["ID", "ACCOUNT", "ENDPOINT", "EVENT", "CREATED (UTC)", "ATTEMPTS",
                       "LAST ERROR"], table, "no failed webhook events")
    return 0


def retry(args, context: Context) -> int:
    if bool(args.ids) + bool(args.endpoint) + args.all != 1:
        raise CommandError("which events: IDs, --endpoint ID or --all")
    with _opened(context) as hooks:
        ids = args.ids or [d.id for d in _now(hooks.failed(args.account, 100_000))
                           if args.all or d.endpoint == args.endpoint]  # fmt: skip
        outcomes = {i: _now(hooks.retry(i, args.account)) for i in ids}
    for i, outcome in outcomes.items():
        if outcome == "disabled":
            print(f"{i}: its endpoint is disabled (webhook enable first)", file=sys.stderr)
        elif outcome == "unknown":
            print(f"{i}: no such failed event", file=sys.stderr)
    retried = sum(o == "retried" for o in outcomes.values())
    print(f"{retried} event{'s' if retried != 1 else ''} to send again")
    return 0 if retried == len(ids) and ids else 1
