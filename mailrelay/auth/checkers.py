"""The checkers: AUTH PLAIN/LOGIN credentials against the directory (with a short cache of
verified logins), IP authentication and address authentication.

A webmail backend or an application may log in once per message; argon2 costs ~25 ms of
CPU each time. A (username, password) pair that verified is remembered for ``cache_ttl``
seconds, keyed by an HMAC of the password under a key made at start-up and never stored,
so the cache holds nothing that reveals or replays a password. A cached login still asks
the directory for the user: if it is gone or was changed (its ``updated`` stamp moved,
as ``user passwd`` and ``user set`` do), the login is verified again. Only a directory
whose stamp moves with every change is trusted so (the file); the LDAP directory caches
verified logins itself for ``[ldap] cache_ttl``, and this cache stays off in front of it.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from zope.interface import implementer

from mailrelay.auth.credentials import IClientAddress, ISenderAddress
from mailrelay.auth.ipauth import AddressAuth, IpAuthTable
from mailrelay.auth.passwords import LOGIN_FAILED
from mailrelay.auth.realm import LoginId, SubmissionRealm
from mailrelay.model import canonical_username

MAX_CACHED = 10000  # logins; beyond it the oldest are forgotten first


def _text(value: str | bytes) -> str:
    """Twisted's own UsernamePassword carries bytes; ClientUsernamePassword carries str."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise UnauthorizedLogin(LOGIN_FAILED)
    return value


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Checks IUsernamePassword credentials; the avatar id is a LoginId of the canonical
    username that carries the user, so the realm looks nothing up again.

    Fails with UnauthorizedLogin for an unknown user and a wrong password alike; a
    DirectoryUnavailable from the directory passes through (the session answers 454).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, directory, cache_ttl: float = 60.0, clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._directory = directory
        # Trusting a stamp that can miss a change would keep an old password working for
        # cache_ttl: such a directory caches logins itself, for its own shorter time.
        self._ttl = cache_ttl if directory.stamps_every_change else 0.0
        self._clock = clock
        self._key = os.urandom(32)
        # canonical username -> (password HMAC, user's updated stamp, expiry)
        self._cache: dict[str, tuple[bytes, float, float]] = {}

    def _mac(self, username: str, password: str) -> bytes:
        message = username.encode() + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        username = _text(credentials.username)
        password = _text(credentials.password)
        client_ip = getattr(credentials, "client_ip", "")
        name = canonical_username(username)
        mac = self._mac(name, password)
        cached = self._cache.get(name)
        if cached is not None:
            cached_mac, stamp, expires = cached
            if self._clock.seconds() >= expires:
                self._cache.pop(name, None)
            # A wrong password leaves the entry alone: guessing must not evict a good login.
            elif hmac.compare_digest(cached_mac, mac):
                user = yield self._directory.getUser(name)
                if user is not None and user.updated == stamp:
                    return LoginId(user.username, "password", client_ip, user=user)
                self._cache.pop(name, None)
        user = yield self._directory.authenticate(username, password)
        if self._ttl > 0:
            self._remember(name, mac, user.updated)
        return LoginId(user.username, "password", client_ip, user=user)

    def _remember(self, name: str, mac: bytes, stamp: float) -> None:
        self._cache.pop(name, None)  # re-insert at the end: the dict is oldest-first
        self._cache[name] = (mac, stamp, self._clock.seconds() + self._ttl)
        while len(self._cache) > MAX_CACHED:
            del self._cache[next(iter(self._cache))]


@implementer(ICredentialsChecker)
class NetworkChecker:
    """IP authentication: a client inside a network of ``table`` is the mapped SMTP user
    (avatar id: a LoginId with method "ip"); any other client is refused."""

    credentialInterfaces = (IClientAddress,)

    def __init__(self, table: IpAuthTable) -> None:
        self._table = table

    def requestAvatarId(self, credentials):
        username = self._table.lookup(credentials.client_ip)
        if username is None:
            return defer.fail(UnauthorizedLogin("no IP authentication for this address"))
        return defer.succeed(LoginId(canonical_username(username), "ip", credentials.client_ip))


@implementer(ICredentialsChecker)
class SenderAddressChecker:
    """Address authentication: a listed envelope sender is its own login (avatar id: a
    LoginId with method "address", the canonical address); any other sender is refused."""

    credentialInterfaces = (ISenderAddress,)

    def __init__(self, addresses: AddressAuth) -> None:
        self._addresses = addresses

    def requestAvatarId(self, credentials):
        if not self._addresses.allows_address(credentials.sender):
            return defer.fail(UnauthorizedLogin("sender not listed for address authentication"))
        sender = canonical_username(credentials.sender.strip())
        return defer.succeed(LoginId(sender, "address", credentials.client_ip))


def make_portal(
    directory,
    cache_ttl: float = 60.0,
    clock=None,
    ip_auth: IpAuthTable | None = None,
    address_auth: AddressAuth | None = None,
    logins=None,
) -> Portal:
    """The portal the SMTP session logs in through: the submission realm over
    ``directory`` (an IDirectory) and the checkers: passwords (``cache_ttl`` is
    ``[directory] login_cache_ttl``; 0 turns the login cache off), and, when given and not
    empty, IP authentication (``[policy] ip_auth``) and address authentication (``[policy]
    address_auth``); ``logins`` (a LoginRecorder) is told of every login."""
    checkers: list = [PasswordChecker(directory, cache_ttl, clock)]
    if ip_auth:
        checkers.append(NetworkChecker(ip_auth))
    if address_auth:
        checkers.append(SenderAddressChecker(address_auth))
    return Portal(SubmissionRealm(directory, logins), checkers)
