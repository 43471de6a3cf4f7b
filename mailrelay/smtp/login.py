"""One connection's login, through the portal (auth/checkers.py) and the session policy.

- AUTH PLAIN and LOGIN: the SASL exchange (sasl.py; ``start``, then ``respond`` to the
  response to each ``334``, while ``exchange`` is set), then ``password``: the policy's
  ``authAttempt`` (it may delay or refuse), the password checker, ``authFailed`` on bad
  credentials.
- At MAIL without AUTH: IP authentication (``by_ip``, ClientAddress credentials: tried
  once per connection) and address authentication (``by_sender``, SenderAddress
  credentials: it vouches for that one sender).

Every login the portal grants is the session's only once the policy's ``authSucceeded``
agrees; a new login logs the previous one out. The lines written here are the session's,
under its log namespace.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailrelay.auth.avatar import ISubmitter
from mailrelay.auth.credentials import ClientAddress, ClientUsernamePassword, SenderAddress
from mailrelay.interfaces import DirectoryUnavailable
from mailrelay.metrics import NO_LISTENER_METRICS
from mailrelay.reply import Reply
from mailrelay.smtp.sasl import MECHANISMS, Login
from mailrelay.text import printable

log = Logger(namespace="mailrelay.smtp.server")  # the session's lines, under one name

MAX_AUTH_LINE = 12288  # an AUTH command or response (RFC 4954 section 4)


def _temporary_failure() -> Reply:
    return Reply(454, "4.7.0", "Temporary authentication failure")


class SessionLogin:
    """The login of one connection: ``avatar`` (an ISubmitter) once logged in, else None.

    ``policy`` is the connection's ISessionPolicy, set once the connection is accepted;
    ``clock`` is the reactor that delays attempts the policy asks to delay; ``metrics``
    (an IListenerMetrics) counts the logins.
    """

    metrics = NO_LISTENER_METRICS

    def __init__(self, portal, clock, session_id: int, client_ip: str = "") -> None:
        self.portal = portal
        self.clock = clock
        self.session_id = session_id
        self.client_ip = client_ip
        self.policy = None
        self.avatar = None
        self.failures = 0  # bad credentials on this connection
        self.ip_tried = False
        self.exchange = None  # the SASL exchange waiting for the response to a 334
        self._logout = None

    @property
    def by_password(self) -> bool:
        return self.avatar is not None and self.avatar.method == "password"

    @property
    def username(self) -> str | None:
        return self.avatar.user.username if self.avatar is not None else None

    # -- AUTH

    def start(self, mechanism: bytes, initial: bytes | None) -> bytes | Login:
        """AUTH: the challenge to send (334), or the credentials once complete. Raises
        Reply for an unknown mechanism (504) or a malformed response (501)."""
        exchange = MECHANISMS.get(mechanism.upper())
        if exchange is None:
            raise Reply(504, "5.5.4", "Unrecognized authentication mechanism")
        exchange = exchange()
        return self._step(exchange, exchange.start(initial))

    def respond(self, line: bytes) -> bytes | Login:
        """The client's response to a 334, as for start(); ``*`` cancels (501)."""
        exchange, self.exchange = self.exchange, None
        if len(line) > MAX_AUTH_LINE:
            raise Reply(500, "5.5.2", "Line too long")
        if line == b"*":
            raise Reply(501, "5.0.0", "Authentication cancelled")
        return self._step(exchange, exchange.next(line))

    def _step(self, exchange, result: bytes | Login) -> bytes | Login:
        if isinstance(result, bytes):
            self.exchange = exchange
        return result

    async def password(self, login: Login, tls: bool) -> bool:
        """Check the credentials an exchange gave; True once logged in, False for bad
        credentials (counted in ``failures``). Raises Reply: the policy's refusal, or 454
        when the directory cannot answer."""
        username = printable(login.username)
        try:
            if login.authzid and login.authzid != login.username:
                raise UnauthorizedLogin("authzid differs from the login")
            if not login.username or not login.password:
                raise UnauthorizedLogin("empty username or password")
            await self._pause(await self._ask("authAttempt", login.username))
            credentials = ClientUsernamePassword(
                login.username, login.password, self.client_ip, tls
            )
            _, avatar, logout = await self.portal.login(credentials, None, ISubmitter)
        except UnauthorizedLogin as e:
            self.failures += 1
            self.metrics.login("password", "failure")
            log.info("session {session}: authentication failed for {user} from {client_ip} "
                     "({why})", session=self.session_id, user=username,
                     client_ip=self.client_ip, why=str(e))
            await self._pause(await self._ask("authFailed", login.username))
            return False
        except Reply:
            self.metrics.login("password", "refused")
            raise
        except DirectoryUnavailable as e:
            self.metrics.login("password", "error")
            log.warn("session {session}: directory unavailable for login {user} from "
                     "{client_ip}: {error}", session=self.session_id, user=username,
                     client_ip=self.client_ip, error=str(e))
            raise _temporary_failure()
        except Exception:
            self.metrics.login("password", "error")
            log.failure("session {session}: login of {user} failed", session=self.session_id,
                        user=username)
            raise _temporary_failure()
        # Not logged on its own (as Postfix does not): "accepted" and "disconnected" name
        # the user, auth=password and TLS; failures are logged, for fail2ban too.
        await self._accept(avatar, logout)
        return True

    # -- without AUTH, at MAIL

    async def by_ip(self) -> None:
        """IP authentication: a portal checker for ClientAddress credentials may know the
        client's network. Tried once per connection (unless the directory failed)."""
        self.ip_tried = True
        try:
            _, avatar, logout = await self.portal.login(
                ClientAddress(self.client_ip), None, ISubmitter
            )
        except (UnauthorizedLogin, UnhandledCredentials):
            return
        except DirectoryUnavailable:
            self.ip_tried = False
            self.metrics.login("ip", "error")
            raise _temporary_failure()
        # Not logged on its own: "accepted" and "disconnected" name the user and auth=ip.
        await self._accept(avatar, logout)

    async def by_sender(self, sender: str) -> None:
        """Address authentication: a sender listed in [policy] address_auth logs in as
        itself (see auth.realm). It vouches for that sender only: a MAIL with another
        sender logs in again as that one, or leaves the session unauthenticated, never
        sending as the earlier address's login."""
        if self.avatar is not None:
            if self.avatar.may_send_as(sender):
                return
            self.drop()
        if not sender:
            return
        try:
            _, avatar, logout = await self.portal.login(
                SenderAddress(sender, self.client_ip), None, ISubmitter
            )
        except (UnauthorizedLogin, UnhandledCredentials):
            return
        except DirectoryUnavailable:
            self.metrics.login("address", "error")
            raise _temporary_failure()
        await self._accept(avatar, logout)
        log.info("session {session}: {client_ip} authenticated by sender address as {user}",
                 session=self.session_id, client_ip=self.client_ip, user=self.username)

    # -- the login itself

    async def _accept(self, avatar, logout) -> None:
        """Make ``avatar`` the login once the policy agrees."""
        try:
            await self._ask("authSucceeded", avatar)
        except BaseException:
            logout()
            self.metrics.login(avatar.method, "refused")
            raise
        self.metrics.login(avatar.method, "success")
        self.drop()
        self.avatar, self._logout = avatar, logout

    def drop(self) -> None:
        """Log out, and forget an exchange in progress."""
        self.exchange = None
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        self.avatar = None

    def forget(self) -> None:
        """Everything learnt before TLS (RFC 3207 4.2): the login, and that IP
        authentication was tried."""
        self.drop()
        self.ip_tried = False

    async def _ask(self, method: str, *args):
        if self.policy is None:
            return None
        return await maybeDeferred(getattr(self.policy, method), *args)

    async def _pause(self, seconds) -> None:
        if seconds:
            await deferLater(self.clock, float(seconds), lambda: None)
