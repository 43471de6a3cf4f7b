"""The realm: turns an authenticated username into the avatar the SMTP session uses."""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.auth.avatar import ISubmitter, Submitter
from mailrelay.auth.passwords import LOGIN_FAILED
from mailrelay.model import SmtpUser
from mailrelay.policy.text import printable

log = Logger()


class LoginId(str):
    """The avatar id of a login without a password: the username, how the client proved it
    (``method`` "ip" or "address") and from where. A password login's id is a plain str."""

    method: str
    client_ip: str

    def __new__(cls, username: str, method: str, client_ip: str) -> LoginId:
        self = super().__new__(cls, username)
        self.method = method
        self.client_ip = client_ip
        return self


def _logout() -> None:
    """Nothing to release: per-connection counters belong to the session's policy."""


@implementer(IRealm)
class SubmissionRealm:
    """Looks the user and its account up in ``directory`` (an IDirectory) at each login, so
    a changed scope or status applies to the next session without a restart.

    IP authentication (a LoginId with method "ip") logs in as the mapped user, which must
    exist. Address authentication (method "address", the id being the sender address)
    logs in as the directory's user of that name when there is one, so its status and
    limits apply; otherwise as a user-level user made up for the occasion: account
    "default", default limits, scope exactly that address.
    """

    def __init__(self, directory) -> None:
        self._directory = directory

    @defer.inlineCallbacks
    def requestAvatar(self, avatarId, mind, *interfaces):
        if ISubmitter not in interfaces:
            raise NotImplementedError(f"{self.__class__.__name__} only provides ISubmitter")
        method = getattr(avatarId, "method", "password")
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
            user = SmtpUser(str(avatarId))
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
        return ISubmitter, avatar, _logout
