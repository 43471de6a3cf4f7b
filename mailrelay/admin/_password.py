"""What the user and admin commands share: a password generated, or read from standard
input, and shown once."""

from __future__ import annotations

import argparse
import sys

from mailrelay.admin.cli import CommandError
from mailrelay.auth.passwords import generate_password

MIN_PASSWORD_LENGTH = 8


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of generating one",
    )


def new_password(args: argparse.Namespace) -> tuple[str, bool]:
    """The password and whether it was generated (and so must be shown)."""
    if not args.password_stdin:
        return generate_password(), True
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("no password on standard input")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CommandError(f"the password is shorter than {MIN_PASSWORD_LENGTH} characters")
    return password, False


def show(name: str, password: str) -> None:
    print(f"password for {name}: {password}")
    print("(shown only this once: only a hash of it is stored)", file=sys.stderr)
