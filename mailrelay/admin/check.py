"""``mailrelay-admin check``: validate the configuration before anything starts."""

from __future__ import annotations

import os

from mailrelay.admin.cli import CommandError


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="check the configuration and the files it names")
    p.set_defaults(func=run)


def run(args, context) -> int:
    config = context.config  # a ConfigError is printed by the entry point (exit 2)
    problems = []
    if not config.tls.generate:  # a generated certificate is made on first start
        for path in (config.tls.certificate, config.tls.key):
            if not os.access(path, os.R_OK):
                problems.append(f"[tls] {path}: not readable")
    users = config.directory.file
    writable = os.access(users, os.R_OK | os.W_OK)
    if config.directory.backend == "file" and os.path.exists(users) and not writable:
        problems.append(f"[directory] file {users}: not readable and writable")
    parent = config.server.data_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        problems.append(f"[server] data_dir {config.server.data_dir}: {parent} is not writable")
    if problems:
        raise CommandError("; ".join(problems))
    print(f"{config.source}: ok ({len(config.listeners)} listeners, "
          f"directory={config.directory.backend}, delivery={config.delivery.mode})")
    return 0
