"""A user's credential lifecycle: its expiry, the networks it may log in from, and when
and from where it last logged in.

A login past ``expires`` or from outside ``allow_from`` is refused like a wrong password
(``535 5.7.8``: the client learns nothing), and the log line says why. It also counts as
a failed login of that client address for the password-guessing defence: the counters are
per address, so the real user, logging in from an allowed network, is never slowed by it.

Last logins are not written to the users file (the admin tool rewrites it, and a write
per login would be heavy and racy): the relay keeps them in a small SQLite file under
``data_dir`` (``[directory] logins_db``, default ``logins.sqlite``), written in batches
off the reactor thread; ``mailrelay-admin user list/show``, the API and the panel read it.
With ``[cluster] postgres`` set they are kept in the database instead (postgres/logins.py),
every node's.
"""

from __future__ import annotations

import os
import re
import time

from twisted.logger import Logger

from mailrelay.auth.ipauth import IpAuthError, parse_network
from mailrelay.features.db import SqliteStore
from mailrelay.flushing import BatchWriter
from mailrelay.model import SmtpUser
from mailrelay.net import parse_ip

log = Logger()

EXPIRED = "expired"
NOT_ALLOWED = "not from an allowed network"
NOWHERE = "0.0.0.0/32"  # an allow-list no client matches (no connection comes from 0.0.0.0)


def parse_networks(text: str) -> tuple[str, ...]:
    """``"203.0.113.0/24;2001:db8::/32"`` (semicolons or commas): the networks in their
    normal form, sorted. Raises IpAuthError naming a bad one."""
    out = {str(parse_network(item)) for item in re.split(r"[;,\s]+", text) if item.strip()}
    return tuple(sorted(out))


def refusal(user: SmtpUser, client_ip: str, now: float | None = None) -> str | None:
    """Why ``user`` may not log in from ``client_ip`` now, or None when it may."""
    if user.expires is not None and (time.time() if now is None else now) >= user.expires:
        return EXPIRED
    if user.allow_from:
        try:
            ip = parse_ip(client_ip)
        except ValueError:  # not an IP address (a UNIX socket peer): in no network
            return NOT_ALLOWED
        if not any(ip in parse_network(net) for net in user.allow_from):
            return NOT_ALLOWED
    return None


def check_allow_from(networks: tuple[str, ...]) -> str | None:
    """What is wrong with a stored allow-list, or None."""
    try:
        for net in networks:
            parse_network(net)
    except IpAuthError as e:
        return str(e)
    return None


class LoginStore(SqliteStore):
    """The last login of each user: when (unix time) and from which address."""

    MIGRATIONS = {1: """
    CREATE TABLE IF NOT EXISTS last_login (
        username TEXT PRIMARY KEY,
        time REAL NOT NULL,
        ip TEXT NOT NULL
    ) WITHOUT ROWID;
    """}

    def add(self, logins: dict[str, tuple[float, str]]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO last_login (username, time, ip) VALUES (?, ?, ?) "
                "ON CONFLICT (username) DO UPDATE SET time = excluded.time, ip = excluded.ip "
                "WHERE excluded.time > last_login.time",
                [(name, when, ip) for name, (when, ip) in logins.items()],
            )

    def all(self) -> dict[str, tuple[float, str]]:
        rows = self.fetch("SELECT username, time, ip FROM last_login")
        return {name: (when, ip) for name, when, ip in rows}

    def get(self, username: str) -> tuple[float, str] | None:
        rows = self.fetch("SELECT time, ip FROM last_login WHERE username = ?", (username,))
        return (rows[0][0], rows[0][1]) if rows else None


def open_login_store(path: str, config=None):
    """The store at ``path`` for a reader (the admin tool): None when there is none yet;
    with ``config``'s ``[cluster] postgres`` set, the database's (postgres/logins.py)."""
    shared = shared_login_store(config)
    if shared is not None:
        return shared
    return LoginStore(path) if os.path.exists(path) else None


def shared_login_store(config):
    """The last logins of every node, in ``[cluster] postgres``; None: this node's file.
    Raises ConnectionError (an OSError) when the database cannot be reached."""
    if config is None or not getattr(getattr(config, "cluster", None), "postgres", ""):
        return None
    from mailrelay.postgres.db import UNAVAILABLE, of_config
    from mailrelay.postgres.logins import PgLoginStore

    try:
        return PgLoginStore(of_config(config))
    except UNAVAILABLE as e:
        raise ConnectionError(f"[cluster] postgres: {str(e).strip()}")


class LoginRecorder(BatchWriter):
    """Remembers logins in memory (the latest per user) and writes them to ``store`` in a
    thread every ``interval`` seconds; ``clock`` drives the timer."""

    what = "last logins"

    def __init__(self, store: LoginStore, reactor, clock=None, interval: float = 5.0) -> None:
        super().__init__(reactor, clock, interval)
        self.store = store
        self._pending: dict[str, tuple[float, str]] = {}

    def record(self, username: str, client_ip: str) -> None:
        self._pending[username] = (self._clock.seconds(), client_ip)

    def _take(self):
        if not self._pending:
            return None
        pending, self._pending = self._pending, {}
        return pending

    def _write(self, batch) -> None:
        self.store.add(batch)

    def _put_back(self, batch) -> None:
        self._pending = batch | self._pending
