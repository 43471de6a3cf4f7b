"""The realm: turns an authenticated username into the avatar the SMTP session uses."""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.auth.avatar import ISubmitter, Submitter
from mailrelay.auth.lifecycle import refusal
from mailrelay.auth.passwords import LOGIN_FAILED
from mailrelay.model import SmtpUser
from mailrelay.text import printable

log = Logger()


class LoginId(str):
    """The avatar id of a login: the username, how the client proved it (``method``
    "password", "ip" or "address"), from where, and the SmtpUser when the checker already
    has it (a password login: the directory answered with it), so that the realm does not
    look it up a second time."""

    method: str
    client_ip: str
    user: SmtpUser | None

    def __new__(cls, username: str, method: str, client_ip: str = "",
                user: SmtpUser | None = None) -> LoginId:
        self = super().__new__(cls, username)
        self.method = method
        self.client_ip = client_ip
        self.user = user
        return self


def _logout() -> None:
    """Nothing to release: per-connection counters belong to the session's policy."""


@implementer(IRealm)
class SubmissionRealm:
    """Makes the avatar from the login's user and its account, as ``directory`` (an
    IDirectory) has them at each login, so a changed scope or status applies to the next
    session without a restart. A password login brings its user (the checker's answer
    from the directory); other logins are looked up here, once.

    IP authentication (a LoginId with method "ip") logs in as the mapped user, which must
    exist. Address authentication (method "address", the id being the sender address)
    logs in as the directory's user of that name when there is one, so its status and
    limits apply; otherwise as a user-level user made up for the occasion: account
    "default", default limits, scope exactly that address.

    Whatever the method, a user past its ``expires`` or outside its ``allow_from`` is
    refused (UnauthorizedLogin with the reason: auth/lifecycle.py), and each login granted
    is told to ``logins`` (a LoginRecorder), when given, for the user's last login.
    """

    def __init__(self, directory, logins=None) -> None:
        self._directory = directory
        self._logins = logins  # a LoginRecorder (auth/lifecycle.py), or None

    @defer.inlineCallbacks
    def requestAvatar(self, avatarId, mind, *interfaces):
        if ISubmitter not in interfaces:
            raise NotImplementedError(f"{self.__class__.__name__} only provides ISubmitter")
        method = getattr(avatarId, "method", "password")
        user = getattr(avatarId, "user", None)
        made_up = False
        if user is None:
            user = yield self._directory.getUser(avatarId)
        if user is None:
            if method == "ip":
                # A configuration mistake, not a client's: say so where the admin looks.
                log.warn(
                    "ip_auth maps {client_ip} to SMTP user {user}, which does not exist; "
                    "refused",
                    client_ip=avatarId.client_ip,
                    user=printable(avatarId),
                )
                raise UnauthorizedLogin("IP authentication: no such user")
            if method != "address":  # deleted between the password check and now
                raise UnauthorizedLogin(LOGIN_FAILED)
            user, made_up = SmtpUser(str(avatarId)), True
        why = refusal(user, avatarId.client_ip) if hasattr(avatarId, "client_ip") else None
        if why is not None:
            # A password login's failure is logged by the session, with this reason.
            if method != "password":
                log.info("{method} login of {user} from {client_ip} refused: {why}",
                         method=method, user=printable(user.username),
                         client_ip=avatarId.client_ip, why=why)
            raise UnauthorizedLogin(why)
        account = yield self._directory.getAccount(user.account)
        avatar = Submitter.for_user(user, account, method)
        if method == "address" and not avatar.may_send_as(avatarId):
            log.warn(
                "address_auth lists {sender}, but account {account} does not authorize "
                "its domain; refused",
                sender=printable(avatarId),
                account=user.account,
            )
            raise UnauthorizedLogin("address authentication: domain not authorized")
        if self._logins is not None and not made_up:
            self._logins.record(user.username, getattr(avatarId, "client_ip", ""))
        return ISubmitter, avatar, _logout
