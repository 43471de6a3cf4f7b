"""The LDAP directory: SMTP users and accounts read from an LDAP server (read-only).

A user is an entry found below ``base_dn`` by ``user_filter`` (the login name, escaped, in
place of ``{username}``); its password is checked by binding as that entry (password_mode
"bind") or against its userPassword hash (password_mode "compare"). The SmtpUser's
username is the entry's uid (``attributes["username"]``), so a client that logs in with the
entry's mail gets the same user; as with the file directory, a uid that is a domain makes a
domain-level user and a uid that is an address a user-level one.

Accounts are entries of ``account_list_filter`` below ``account_base``, named by their cn;
a user's account is its mailrelayAccount value (absent: "default"). The attribute names
are configurable (ldap_mapping.DEFAULT_ATTRIBUTES); the schema is in etc/ldap/.

LDAP calls run in a thread pool of ``pool_size`` threads (one search and one bind
connection each at most), never on the reactor. Users, accounts and verified logins are
cached for ``cache_ttl`` seconds of the injected clock. When LDAP cannot answer, calls
errback with DirectoryUnavailable, and the next call tries again on a new connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

from ldap3.core.exceptions import LDAPInvalidFilterError
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.directory.ldap_cache import MISSING, TtlCache
from mailrelay.directory.ldap_client import Entry, LdapClient, LdapConfigError
from mailrelay.directory.ldap_mapping import (
    account_attributes,
    account_from_entry,
    attribute_names,
    user_attributes,
    user_from_entry,
)
from mailrelay.directory.ldap_passwords import UnsupportedScheme, verify_any
from mailrelay.interfaces import DirectoryUnavailable, IDirectory
from mailrelay.metrics import NO_METRICS
from mailrelay.model import Account, SmtpUser, canonical_username

__all__ = ["LdapDirectory", "LdapConfigError", "DEFAULT_USER_FILTER"]

log = Logger()

DEFAULT_USER_FILTER = "(|(uid={username})(mail={username}))"
DEFAULT_USER_LIST_FILTER = "(objectClass=mailrelayUser)"
DEFAULT_ACCOUNT_LIST_FILTER = "(objectClass=mailrelayAccountEntry)"
_MAX_LOGIN = 320  # longer than any address or domain: not worth a search
# Checked when the login is unknown, so that an unknown user costs about what a wrong
# password costs (an argon2id hash of moderate cost) and the answer time does not tell which.
_UNKNOWN_USER_HASH = (
    b"{ARGON2}$argon2id$v=19$m=19456,t=2,p=1$SmN6gyhymAH2wV7K6aAxjA$"
    b"3XXRhpxcvw+1uA5pYqC9OwD4XE0BDwOfiiHPQiiLlzI"
)


class _Ambiguous(Exception):
    """More than one entry matched a login or account name."""


@implementer(IDirectory)
class LdapDirectory:
    metrics = NO_METRICS  # the relay's IMetrics: each call's time and whether it answered

    writable = False
    stamps_every_change = False  # modifyTimestamp: one-second resolution, maybe unreadable

    def __init__(
        self,
        uris: list[str],
        base_dn: str,
        *,
        start_tls: bool = False,
        ca_file: str | None = None,
        bind_dn: str = "",
        bind_password: str = "",
        user_filter: str = DEFAULT_USER_FILTER,
        user_list_filter: str = DEFAULT_USER_LIST_FILTER,
        account_base: str | None = None,
        account_list_filter: str = DEFAULT_ACCOUNT_LIST_FILTER,
        password_mode: str = "bind",
        attributes: dict[str, str] | None = None,
        pool_size: int = 4,
        timeout: float = 5.0,
        cache_ttl: float = 60.0,
        reactor: IReactorThreads | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """ValueError (one line, naming the setting) for a value that cannot work."""
        if reactor is None:
            from twisted.internet import reactor
        if password_mode not in ("bind", "compare"):
            raise ValueError(f"password_mode must be bind or compare, not {password_mode!r}")
        if "{username}" not in user_filter:
            raise ValueError(f"user_filter {user_filter!r} does not contain {{username}}")
        for setting, text in (
            ("user_filter", user_filter.replace("{username}", "x")),
            ("user_list_filter", user_list_filter),
            ("account_list_filter", account_list_filter),
        ):
            _check_filter(setting, text)
        if not 1 <= pool_size <= 64:
            raise ValueError(f"pool_size must be 1..64, not {pool_size}")
        if not base_dn:
            raise ValueError("base_dn is empty")
        self.base_dn = base_dn
        self.account_base = account_base or base_dn
        self._user_filter = user_filter
        self._user_list_filter = user_list_filter
        self._account_list_filter = account_list_filter
        self._compare = password_mode == "compare"
        self._names = attribute_names(attributes)
        self._client = LdapClient(
            uris,
            start_tls=start_tls,
            ca_file=ca_file,
            bind_dn=bind_dn,
            bind_password=bind_password,
            timeout=timeout,
        )
        self._reactor = reactor
        clock = clock or reactor
        self._users: TtlCache[str, SmtpUser | None] = TtlCache(clock, cache_ttl)
        self._accounts: TtlCache[str, Account | None] = TtlCache(clock, cache_ttl)
        self._logins: TtlCache[tuple[str, bytes], SmtpUser] = TtlCache(clock, cache_ttl)
        self._login_key = os.urandom(32)  # cached logins hold an HMAC, not the password
        self._available = True
        # Started and stopped with the reactor, as twisted.enterprise.adbapi does.
        self._pool = ThreadPool(minthreads=0, maxthreads=pool_size, name="ldap-directory")
        self._shutdown_id = None
        self._start_id = reactor.callWhenRunning(self._start)

    @classmethod
    def from_config(
        cls,
        settings: object,
        reactor: IReactorThreads | None = None,
        clock: IReactorTime | None = None,
    ) -> LdapDirectory:
        """Built from the parsed ``[ldap]`` settings (attributes named like the arguments;
        the optional ones may be missing)."""
        names = [
            "start_tls", "ca_file", "bind_dn", "bind_password", "user_filter",
            "user_list_filter", "account_base", "account_list_filter", "password_mode",
            "attributes", "pool_size", "timeout", "cache_ttl",
        ]  # fmt: skip
        options = {n: getattr(settings, n) for n in names if getattr(settings, n, None) is not None}
        return cls(settings.uris, settings.base_dn, reactor=reactor, clock=clock, **options)

    # -- lifecycle --------------------------------------------------------------------

    def _start(self) -> None:
        self._start_id = None
        self._pool.start()
        self._shutdown_id = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._final_close
        )

    def close(self) -> None:
        """Stop the threads and drop the connections (waits for calls in progress)."""
        if self._start_id is not None:
            self._reactor.removeSystemEventTrigger(self._start_id)
            self._start_id = None
        if self._shutdown_id is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_id)
        self._final_close()

    def _final_close(self) -> None:
        self._shutdown_id = None
        self._pool.stop()
        self._client.close()

    # -- IDirectory -------------------------------------------------------------------

    def check_now(self) -> None:
        """check(), blocking: for startup, before the reactor runs. Raises the same."""
        self._client.check(list(dict.fromkeys([self.base_dn, self.account_base])))

    def check(self) -> defer.Deferred[None]:
        """Bind as the service entry and read the bases once, for a clear startup error.

        Errbacks with LdapConfigError ("LDAP bind as <dn> failed: invalid credentials",
        "LDAP base <dn> does not exist") or DirectoryUnavailable (unreachable, TLS).
        """
        bases = list(dict.fromkeys([self.base_dn, self.account_base]))
        d = self._call(self._client.check, bases)
        d.addCallback(
            lambda _: log.info(
                "LDAP directory {uris} ready, users below {base}",
                uris=" ".join(self._client.uris),
                base=self.base_dn,
            )
        )
        return d

    def authenticate(self, username: str, password: str) -> defer.Deferred[SmtpUser]:
        if not _usable(username) or not password or not _encodable(password):
            return defer.fail(UnauthorizedLogin())
        key = (username.lower(), hmac.digest(self._login_key, password.encode(), hashlib.sha256))
        cached = self._logins.get(key)
        if cached is not MISSING:
            return defer.succeed(cached)

        def verified(entry: Entry | None) -> SmtpUser:
            user = entry and user_from_entry(entry, self._names, username)
            if not user:
                raise UnauthorizedLogin()
            self._logins.put(key, user)
            return user

        d = self._call(self._authenticate, username, password)
        d.addCallback(verified)
        d.addErrback(self._refused, username)
        return d

    def getUser(self, username: str) -> defer.Deferred[SmtpUser | None]:
        if not _usable(username):
            return defer.succeed(None)
        key = username.lower()
        cached = self._users.get(key)
        if cached is not MISSING:
            return defer.succeed(cached)

        def found(entry: Entry | None) -> SmtpUser | None:
            user = entry and user_from_entry(entry, self._names, username)
            self._users.put(key, user or None)
            return user or None

        d = self._call(self._find_user, username, False)
        d.addCallbacks(found, self._ambiguous_is_none)
        return d

    def getAccount(self, name: str) -> defer.Deferred[Account | None]:
        if not _usable(name):
            return defer.succeed(None)
        key = name.lower()
        cached = self._accounts.get(key)
        if cached is not MISSING:
            return defer.succeed(cached)
        query = f"(&{self._account_list_filter}({self._names['accountName']}={_escape(name)}))"

        def found(entries: list[Entry]) -> Account | None:
            if len(entries) > 1:
                raise _Ambiguous("account", name, [e.dn for e in entries])
            account = entries and account_from_entry(entries[0], self._names)
            self._accounts.put(key, account or None)
            return account or None

        d = self._call(
            self._client.search,
            self.account_base,
            query,
            account_attributes(self._names),
            size_limit=2,
        )
        d.addCallback(found)
        d.addErrback(self._ambiguous_is_none)
        return d

    def listUsers(self, account: str | None = None) -> defer.Deferred[list[SmtpUser]]:
        def mapped(entries: list[Entry]) -> list[SmtpUser]:
            users = [u for u in (user_from_entry(e, self._names) for e in entries) if u]
            if account is not None:
                users = [u for u in users if u.account.lower() == account.lower()]
            return sorted(users, key=lambda u: u.username)

        d = self._call(
            self._client.search,
            self.base_dn,
            self._user_list_filter,
            user_attributes(self._names),
        )
        d.addCallback(mapped)
        return d

    def listAccounts(self) -> defer.Deferred[list[Account]]:
        def mapped(entries: list[Entry]) -> list[Account]:
            accounts = [a for a in (account_from_entry(e, self._names) for e in entries) if a]
            return sorted(accounts, key=lambda a: a.name)

        d = self._call(
            self._client.search,
            self.account_base,
            self._account_list_filter,
            account_attributes(self._names),
        )
        d.addCallback(mapped)
        return d

    # -- in the thread pool -----------------------------------------------------------

    def _find_user(self, login: str, with_password: bool) -> Entry | None:
        forms = [login]
        canonical = canonical_username(login)
        if canonical.lower() != login.lower():  # an IDNA name: match either spelling
            forms.append(canonical)
        filters = [self._user_filter.replace("{username}", _escape(f)) for f in forms]
        query = filters[0] if len(filters) == 1 else "(|" + "".join(filters) + ")"
        entries = self._client.search(
            self.base_dn,
            query,
            user_attributes(self._names, with_password=with_password),
            size_limit=2,
        )
        if len(entries) > 1:
            raise _Ambiguous("login", login, [e.dn for e in entries])
        return entries[0] if entries else None

    def _authenticate(self, login: str, password: str) -> Entry | None:
        entry = self._find_user(login, self._compare)
        if self._compare:
            stored = entry.raw(self._names["password"]) if entry else [_UNKNOWN_USER_HASH]
            return entry if verify_any(password, stored) and entry else None
        # An unknown login still costs one bind, like a wrong password.
        dn = entry.dn if entry else f"cn=mailrelay-unknown-user,{self.base_dn}"
        return entry if self._client.verify_bind(dn, password) and entry else None

    # -- on the reactor ---------------------------------------------------------------

    def _call(self, f: Callable, *args, **kwargs) -> defer.Deferred:
        """Run ``f`` in the pool; DirectoryUnavailable (logged once per outage) on trouble."""
        d = threads.deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)
        d.addBoth(self._timed, self._reactor.seconds())
        d.addCallbacks(self._answered, self._unanswered)
        return d

    def _timed(self, result: object, started: float) -> object:
        answered = not isinstance(result, Failure) or bool(result.check(_Ambiguous,
                                                                       UnsupportedScheme))
        self.metrics.directory(self._reactor.seconds() - started, answered)
        return result

    def _answered(self, result: object) -> object:
        if not self._available:
            self._available = True
            log.info("LDAP directory answers again")
        return result

    def _unanswered(self, failure: Failure) -> Failure:
        if failure.check(_Ambiguous, UnsupportedScheme):
            return self._answered(failure)
        if not failure.check(DirectoryUnavailable):
            log.failure("LDAP directory call failed", failure)
            failure = Failure(DirectoryUnavailable("LDAP directory error (see the log)"))
        if self._available:
            self._available = False
            log.error("LDAP directory unavailable: {reason}", reason=failure.getErrorMessage())
        return failure

    def _refused(self, failure: Failure, login: str) -> Failure:
        """Ambiguous logins and unsupported hashes: logged for the admin, a plain refusal
        for the client."""
        if failure.check(UnsupportedScheme):
            log.warn(
                "LDAP login {login!r} refused: userPassword scheme {scheme} is not supported",
                login=login,
                scheme=failure.getErrorMessage(),
            )
            return Failure(UnauthorizedLogin())
        if failure.check(_Ambiguous):
            self._log_ambiguous(failure)
            return Failure(UnauthorizedLogin())
        return failure

    def _ambiguous_is_none(self, failure: Failure) -> None:
        failure.trap(_Ambiguous)
        self._log_ambiguous(failure)
        return None

    @staticmethod
    def _log_ambiguous(failure: Failure) -> None:
        what, name, dns = failure.value.args
        log.warn(
            "LDAP {what} {name!r} matches several entries ({dns}); refused",
            what=what,
            name=name,
            dns="; ".join(dns),
        )


def _escape(value: str) -> str:
    return escape_filter_chars(value)


def _check_filter(setting: str, text: str) -> None:
    try:
        parse_filter(text, None, False, True, None, False)
    except LDAPInvalidFilterError:
        raise ValueError(f"{setting} {text!r} is not a valid LDAP filter")


def _encodable(text: str) -> bool:
    """LDAP strings are UTF-8: a lone surrogate (undecodable client bytes) cannot match."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _usable(login: str) -> bool:
    return bool(login) and len(login) <= _MAX_LOGIN and _encodable(login)
