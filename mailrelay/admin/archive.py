"""mailrelay-admin archive list USER: the archived copies of a user's messages."""

from __future__ import annotations

from mailrelay.admin import _features as features
from mailrelay.admin import _output as output
from mailrelay.admin.cli import Context
from mailrelay.features.archive import Archive
from mailrelay.model import canonical_username


def register(subparsers) -> None:
    parser = subparsers.add_parser("archive", help="archived messages: list")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="list a user's archived messages, oldest first")
    p.add_argument("user", help="the SMTP user")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)


def list_(args, context: Context) -> int:
    root = features.paths(context).archive_dir
    entries = Archive(root).list(canonical_username(args.user))
    if args.json:
        output.print_json([e.__dict__ for e in entries])
        return 0
    rows = [[e.id, output.when(e.date), e.sender, str(e.size), e.subject] for e in entries]
    output.print_list(["ID", "ARCHIVED (UTC)", "FROM", "SIZE", "SUBJECT"], rows,
                      f"no archived messages for {args.user}")
    return 0
