"""The realm: turns an authenticated username into the avatar the SMTP session uses."""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import implementer

from mailrelay.auth.avatar import ISubmitter, Submitter
from mailrelay.auth.passwords import LOGIN_FAILED


def _logout() -> None:
    """Nothing to release: per-connection counters belong to the session's policy."""


@implementer(IRealm)
class SubmissionRealm:
    """Looks the user and its account up in ``directory`` (an IDirectory) at each login, so
    a changed scope or status applies to the next session without a restart."""

    def __init__(self, directory) -> None:
        self._directory = directory

    @defer.inlineCallbacks
    def requestAvatar(self, avatarId, mind, *interfaces):
        if ISubmitter not in interfaces:
            raise NotImplementedError(f"{self.__class__.__name__} only provides ISubmitter")
        user = yield self._directory.getUser(avatarId)
        if user is None:  # deleted between the password check and now
            raise UnauthorizedLogin(LOGIN_FAILED)
        account = yield self._directory.getAccount(user.account)
        return ISubmitter, Submitter.for_user(user, account), _logout
