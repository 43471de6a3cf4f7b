"""mailrelay-admin: one entry point; each topic (user, account, queue, ...) is a module.

A topic module in this package defines ``register(subparsers)`` which adds its
sub-command parser(s) and sets ``func=handler`` on them; a handler takes
``(args, context)`` and returns the exit status. Topics are discovered, not listed here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import mailrelay.admin
from mailrelay.config import ConfigError, load_config


class CommandError(Exception):
    """A user mistake: printed as one line, exit status 1 (or ``status``)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Context:
    """What a handler gets besides its arguments: the loaded configuration."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config = None

    @property
    def config(self):
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailrelay-admin", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="configuration file (default: embedded defaults)")
    sub = parser.add_subparsers(dest="topic", metavar="TOPIC", required=True)
    for info in sorted(pkgutil.iter_modules(mailrelay.admin.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"mailrelay.admin.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    context = Context(args.config)
    try:
        return int(args.func(args, context) or 0)
    except ConfigError as e:
        print(f"mailrelay-admin: {e}", file=sys.stderr)
        return 2
    except CommandError as e:
        print(f"mailrelay-admin: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    # ``python -m`` runs this file as __main__, a second copy of the module: topics raise
    # mailrelay.admin.cli.CommandError, so run that module's main to catch the same class.
    from mailrelay.admin import cli

    sys.exit(cli.main())
