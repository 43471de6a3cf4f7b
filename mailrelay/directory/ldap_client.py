"""Blocking LDAP operations with a small pool of connections, for the directory's threads.

Every method blocks (network, TLS) and must run in a worker thread, never on the reactor.
Communication failures become DirectoryUnavailable; a bad service bind or a missing base
becomes LdapConfigError (also a DirectoryUnavailable, so a session still answers 4xx), with
a one-line message meant for the admin. Nothing here logs: the caller logs on the reactor.
"""

from __future__ import annotations

import math
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException

from mailrelay.interfaces import DirectoryUnavailable

# Bind results that mean "these credentials are not valid for this entry".
_REFUSED_BIND = {
    "invalidCredentials",
    "inappropriateAuthentication",
    "insufficientAccessRights",
    "unwillingToPerform",  # e.g. a locked account (ppolicy)
    "noSuchObject",
    "invalidDNSyntax",
}
_PAGED_RESULTS = "1.2.840.113556.1.4.319"
_PAGE_SIZE = 500
T = TypeVar("T")


class LdapConfigError(DirectoryUnavailable):
    """The service bind or a configured base is wrong; the text is one line for the admin."""


@dataclass(frozen=True)
class Entry:
    dn: str
    attributes: dict[str, list[bytes]]  # keys lower-cased

    def raw(self, name: str) -> list[bytes]:
        return self.attributes.get(name.lower(), [])

    def values(self, name: str) -> list[str]:
        return [v.decode("utf-8", "replace") for v in self.raw(name)]

    def first(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None


class LdapClient:
    """Searches as the service entry and checks passwords by binding, over ``uris`` in order.

    At most one search connection and one bind connection per worker thread exist, so the
    thread pool's size bounds the number of connections.
    """

    def __init__(
        self,
        uris: list[str],
        *,
        start_tls: bool = False,
        ca_file: str | None = None,
        bind_dn: str = "",
        bind_password: str = "",
        timeout: float = 5.0,
    ) -> None:
        if not uris:
            raise ValueError("at least one LDAP URI is needed")
        for uri in uris:
            if urlsplit(uri).scheme.lower() not in ("ldap", "ldaps"):
                raise ValueError(f"{uri!r} is not an ldap:// or ldaps:// URI")
        if bind_dn and not bind_password:
            raise ValueError("bind_password is empty (leave bind_dn empty to search anonymously)")
        self.uris = list(uris)
        self.bind_dn = bind_dn
        self._start_tls = start_tls
        self._bind_password = bind_password
        self._timeout = timeout
        self._tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file or None)
        self._lock = threading.Lock()
        self._idle_search: list[ldap3.Connection] = []
        self._idle_bind: list[ldap3.Connection] = []

    # -- operations -------------------------------------------------------------------

    def search(
        self, base: str, filter: str, attributes: list[str], *, size_limit: int = 0
    ) -> list[Entry]:
        """Entries below ``base`` matching ``filter`` (already escaped); with ``size_limit``,
        at most that many (finding more than that is not an error: the caller decides)."""

        def run(conn: ldap3.Connection) -> list[Entry]:
            if size_limit:
                _ok, result, response, _request = conn.search(
                    base,
                    filter,
                    ldap3.SUBTREE,
                    attributes=attributes,
                    size_limit=size_limit,
                    time_limit=max(1, int(self._timeout)),
                )
                _check_search(base, result, size_limit_ok=True)
                return _entries(response)
            return list(self._paged(conn, base, filter, attributes))

        return self._with_connection(self._idle_search, self._open_service, run)

    def verify_bind(self, dn: str, password: str) -> bool:
        """True when a simple bind as ``dn`` with ``password`` succeeds.

        An empty password is refused here: LDAP would treat it as an anonymous bind and
        report success (RFC 4513 5.1.2).
        """
        if not password:
            return False

        def run(conn: ldap3.Connection) -> bool:
            ok, result, _response, _request = conn.rebind(dn, password)
            if ok:
                return True
            if result and result.get("description") in _REFUSED_BIND:
                return False
            raise DirectoryUnavailable(f"LDAP bind as a user failed: {_words(result)}")

        return self._with_connection(self._idle_bind, self._open, run)

    def check(self, bases: list[str]) -> None:
        """Bind as the service entry on a new connection and read each base entry once."""
        conn = self._open_service()
        try:
            for base in bases:
                _ok, result, _response, _request = conn.search(
                    base, "(objectClass=*)", ldap3.BASE, attributes=["1.1"]
                )
                _check_search(base, result)
        except LDAPException as e:
            raise DirectoryUnavailable(f"LDAP search failed: {_describe(e)}")
        finally:
            _close(conn)

    def close(self) -> None:
        with self._lock:
            idle = self._idle_search + self._idle_bind
            self._idle_search, self._idle_bind = [], []
        for conn in idle:
            _close(conn)

    # -- connections ------------------------------------------------------------------

    def _with_connection(
        self,
        idle: list[ldap3.Connection],
        open_new: Callable[[], ldap3.Connection],
        run: Callable[[ldap3.Connection], T],
    ) -> T:
        """Run ``run`` on an idle connection, or a new one; a pooled connection that fails
        (the server restarted, an idle timeout closed it) is replaced once."""
        with self._lock:
            pooled = idle.pop() if idle else None
        if pooled is not None:
            try:
                return self._run(idle, pooled, run)
            except LDAPException:
                pass  # stale: try once more on a new connection
        try:
            return self._run(idle, open_new(), run)
        except LDAPException as e:
            raise DirectoryUnavailable(f"LDAP request failed: {_describe(e)}")

    def _run(
        self, idle: list[ldap3.Connection], conn: ldap3.Connection, run: Callable[..., T]
    ) -> T:
        try:
            result = run(conn)
        except BaseException:
            _close(conn)
            raise
        with self._lock:
            idle.append(conn)
        return result

    def _open_service(self) -> ldap3.Connection:
        conn = self._open()
        if not self.bind_dn:
            return conn  # searches anonymously
        try:
            ok, result, _response, _request = conn.rebind(self.bind_dn, self._bind_password)
        except LDAPException as e:
            _close(conn)
            raise DirectoryUnavailable(f"LDAP bind as {self.bind_dn} failed: {_describe(e)}")
        if not ok:
            _close(conn)
            raise LdapConfigError(f"LDAP bind as {self.bind_dn} failed: {_words(result)}")
        return conn

    def _open(self) -> ldap3.Connection:
        """A connection to the first URI that answers (StartTLS done, not yet bound)."""
        errors = []
        for uri in self.uris:
            # A new Server each time: ldap3 shuns an address for a while after a failure,
            # which would delay recovery once the server is back.
            server = ldap3.Server(
                uri,
                connect_timeout=self._timeout,
                get_info=ldap3.NONE,
                tls=self._tls,
                mode=ldap3.IP_V4_PREFERRED,
            )
            conn = ldap3.Connection(
                server,
                client_strategy=ldap3.SAFE_SYNC,
                # ldap3 packs this into SO_RCVTIMEO as whole seconds.
                receive_timeout=max(1, math.ceil(self._timeout)),
                raise_exceptions=False,
                read_only=True,
                auto_referrals=False,
                auto_escape=False,  # filters arrive escaped (escape_filter_chars)
            )
            try:
                conn.open()
                if self._start_tls and not server.ssl:
                    conn.start_tls()
            except LDAPException as e:
                _close(conn)
                errors.append(f"{uri}: {_describe(e)}")
                continue
            return conn
        raise DirectoryUnavailable("LDAP server unreachable: " + "; ".join(errors))

    def _paged(
        self, conn: ldap3.Connection, base: str, filter: str, attributes: list[str]
    ) -> Iterator[Entry]:
        cookie = None
        while True:
            _ok, result, response, _request = conn.search(
                base,
                filter,
                ldap3.SUBTREE,
                attributes=attributes,
                paged_size=_PAGE_SIZE,
                paged_cookie=cookie,
            )
            _check_search(base, result)
            yield from _entries(response)
            control = (result.get("controls") or {}).get(_PAGED_RESULTS, {})
            cookie = control.get("value", {}).get("cookie")
            if not cookie:
                return


def _check_search(base: str, result: dict, *, size_limit_ok: bool = False) -> None:
    description = result.get("description")
    if description == "success" or (description == "sizeLimitExceeded" and size_limit_ok):
        return
    if description == "sizeLimitExceeded":
        raise DirectoryUnavailable(
            f"LDAP search below {base} hit the server's size limit: allow the service entry "
            "more (OpenLDAP: olcLimits size.prtotal=unlimited)"
        )
    if description == "noSuchObject":
        raise LdapConfigError(f"LDAP base {base} does not exist")
    raise DirectoryUnavailable(f"LDAP search below {base} failed: {_words(result)}")


def _entries(response: list[dict] | None) -> list[Entry]:
    return [
        Entry(
            item["dn"],
            {name.lower(): list(values) for name, values in item["raw_attributes"].items()},
        )
        for item in response or ()
        if item.get("type") == "searchResEntry"
    ]


def _words(result: dict | None) -> str:
    """``invalidCredentials`` -> ``invalid credentials`` (plus the server's message)."""
    if not result:
        return "no answer"
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", result.get("description") or "error").lower()
    message = (result.get("message") or "").strip()
    return f"{text} ({message})" if message else text


def _describe(error: Exception) -> str:
    """A one-line reason from an ldap3 exception (they can carry a whole certificate)."""
    text = str(error.args[0] if len(error.args) == 1 else error)
    if "doesn't match any name" in text:
        return "the server certificate does not match the host name"
    return text.splitlines()[0] if text else type(error).__name__


def _close(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass  # already closed or broken: nothing left to release
    if conn.socket is not None:
        conn.socket.close()  # ldap3 keeps the socket of a failed open() or TLS handshake
