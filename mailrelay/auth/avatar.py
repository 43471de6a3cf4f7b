"""The avatar a successful login gets: who the client is and which senders it may use."""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Attribute, Interface, implementer

from mailrelay.model import Account, SmtpUser, Status
from mailrelay.scope import Scope


class ISubmitter(Interface):
    """The interface the SMTP session asks the portal for."""

    user = Attribute("The SmtpUser")
    account = Attribute("The user's Account, or None when the directory has none")
    scope = Attribute("The effective sender Scope (user scope within the account's domains)")
    method = Attribute('How the client was authenticated: "password", "ip" or "address"')


@implementer(ISubmitter)
@dataclass(frozen=True)
class Submitter:
    user: SmtpUser
    account: Account | None
    scope: Scope
    method: str = "password"

    @classmethod
    def for_user(cls, user: SmtpUser, account: Account | None, method: str = "password"):
        return cls(user, account, user.effective_scope(account), method)

    def may_send_as(self, address: str) -> bool:
        return self.scope.allows(address)

    @property
    def blocked(self) -> bool:
        return self.user.status is Status.BLOCKED

    @property
    def sandboxed(self) -> bool:
        return self.user.status is Status.SANDBOXED
