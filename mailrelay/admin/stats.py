"""mailrelay-admin stats [USER]: what happened to the mail, per user."""

from __future__ import annotations

from mailrelay.admin import _features as features
from mailrelay.admin import _output as output
from mailrelay.admin.cli import Context
from mailrelay.features.stats import Event


def register(subparsers) -> None:
    p = subparsers.add_parser("stats", help="message statistics, per user or account")
    p.add_argument("user", nargs="?", help="one SMTP user (default: everyone)")
    p.add_argument("--account", help="one account (default: the user's, or all)")
    p.add_argument("--since", help="from this date (2026-11-01, UTC) or this long ago (7d, 12h)")
    p.add_argument("--by", choices=["day", "hour"], help="one row per day or hour")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args, context: Context) -> int:
    account, user = args.account, None
    if args.user:
        user, users_account = features.user_account(context, args.user)
        account = account or users_account
    since = features.since(args.since) if args.since else None
    suppressions, store = features.stores(context)
    totals = store.query(account, user, since)
    periods = store.query(account, user, since, period=args.by) if args.by else []
    suppressions.close()
    store.close()
    if args.json:
        out = {"account": account, "user": user, "since": since, "totals": totals}
        if args.by:
            out["periods"] = [
                {"start": p.start, "account": p.account, "user": p.user, **p.counts}
                for p in periods
            ]
        output.print_json(out)
        return 0
    events = [e.value for e in Event]
    if args.by:
        rows = [
            [output.when(p.start)[: 10 if args.by == "day" else 16], p.account, p.user]
            + [str(p.counts.get(e, 0)) for e in events]
            for p in periods
        ]
        output.print_table([args.by.upper(), "ACCOUNT", "USER", *map(str.upper, events)], rows)
        print()
    output.print_table(["EVENT", "TOTAL"], [[e, str(totals[e])] for e in events])
    return 0
