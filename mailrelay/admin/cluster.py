"""mailrelay-admin cluster import-users [FILE]: move a single node's users into the shared
database of ``[cluster] postgres``.

The accounts and users of the user file (``[directory] file`` by default) that the
database does not have yet are added, with their password hashes, notes, verification
state and time stamps as they are; those it has are left as they are there, so running it
again changes nothing. All or nothing: a user that does not fit its account as the
database has it refuses the whole import, saying which.
"""

from __future__ import annotations

from mailrelay.admin._directory import admin_errors
from mailrelay.admin.cli import CommandError, Context
from mailrelay.directory import shared_users
from mailrelay.directory.filedir import read_file


def register(subparsers) -> None:
    parser = subparsers.add_parser("cluster", help="the stores shared by several nodes")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("import-users", help="add a user file's accounts and users to the "
                                            "database of [cluster] postgres (once)")
    p.add_argument("file", nargs="?", help="the user file (default: [directory] file)")
    p.set_defaults(func=import_users)


def import_users(args, context: Context) -> int:
    from mailrelay.postgres.users import import_data

    config = context.config
    if not config.cluster.postgres:
        raise CommandError("[cluster] postgres is not set: there is no database to import into")
    if config.directory.backend == "ldap":
        raise CommandError("[directory] backend is ldap: the users stay in the LDAP directory")
    path = args.file or config.directory.file
    with admin_errors(path):
        data, stat = read_file(path)
        if stat is None:
            raise CommandError(f"{path}: no such file")
        counts = import_data(shared_users(config), data)
    print(f"imported {counts['accounts']} account(s) and {counts['users']} user(s) from {path}")
    if counts["accounts_kept"] or counts["users_kept"]:
        print(f"already in the database, left as they are there: {counts['accounts_kept']} "
              f"account(s), {counts['users_kept']} user(s)")
    return 0
