"""The sender checks: which senders a login may use.

At MAIL FROM, in this order (the first refusal wins):

- a blocked user: ``550 5.7.1``;
- the null sender ``<>`` (bounces come from the relay itself, never from a client):
  ``550 5.7.1``;
- a sender outside the login's scope (mailrelay/scope.py): ``553 5.1.7`` when only a
  quoted local part keeps it out (scopes hold plain addresses), else ``550 5.7.1``, and
  the wrapped policy hears of it (``senderRefused``: domain notifications, statistics);
- with ``[admin] verify_senders``, a sender whose scope entries all still wait for
  confirmation (mailrelay/verification.py): ``550 5.7.1``.

Each address of the From: header is held to the scope the same way, while the message
data arrives (``550 5.6.0`` for a quoted local part, else ``550 5.7.1``).

SenderPolicy puts these checks around another ISubmissionPolicy, or none: the SMTP
factory wraps the policy it is given, so every session has them, and the wrapped policy
hears of MAIL only for a sender that passed them.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.interfaces import ISenderChecks, ISubmissionPolicy
from mailrelay.reply import Reply
from mailrelay.verification import is_verified

log = Logger()


@implementer(ISubmissionPolicy)
class SenderPolicy:
    """The sender checks around ``policy`` (an ISubmissionPolicy, or None); its sessions
    provide ISenderChecks. ``verify_senders``: refuse senders awaiting confirmation."""

    def __init__(self, policy=None, verify_senders: bool = False) -> None:
        self.policy = policy
        self.verify_senders = verify_senders

    def connect(self, client_ip: str):
        """The wrapped policy's answer (a Reply refuses the connection), checks added."""
        if self.policy is None:
            return SenderChecks(None, self.verify_senders)
        session = self.policy.connect(client_ip)
        if isinstance(session, Deferred):
            return session.addCallback(SenderChecks, self.verify_senders)
        return SenderChecks(session, self.verify_senders)


def _nothing(*args) -> None:
    """A hook of the wrapped policy when there is none."""


@implementer(ISenderChecks)
class SenderChecks:
    """One connection's sender checks; every other hook is the wrapped session policy's
    (``session``, or None for none)."""

    def __init__(self, session, verify_senders: bool = False) -> None:
        self._session = session
        self._verify = verify_senders

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        hook = _nothing if self._session is None else getattr(self._session, name)
        setattr(self, name, hook)  # found once per connection: the hooks run per message
        return hook

    def mailFrom(self, avatar, sender: str):
        user = avatar.user
        if avatar.blocked:
            raise Reply(550, "5.7.1", f"user {user.username} is blocked")
        if not sender:
            raise Reply(550, "5.7.1", f"the null sender <> is not allowed for user "
                        f"{user.username}")
        if not avatar.scope.allows(sender):
            if _quoted_in_scope(avatar, sender):
                raise Reply(553, "5.1.7", f"Sender address <{sender}>: quoted local parts "
                            "are not accepted, send from the plain address")
            self._refused(avatar, sender, False)
            raise Reply(550, "5.7.1", f"Sender address <{sender}> not allowed for user "
                        f"{user.username}")
        if self._verify and not is_verified(user, sender):
            raise Reply(550, "5.7.1", f"sender <{sender}> not verified: follow the "
                        "confirmation link mailed to it")
        if self._session is not None:
            return self._session.mailFrom(avatar, sender)
        return None

    def headerFrom(self, avatar, address: str) -> None:
        if avatar.scope.allows(address):
            return
        if _quoted_in_scope(avatar, address):
            raise Reply(550, "5.6.0", f"From: header address {address}: quoted local parts "
                        "are not accepted, use the plain address")
        self._refused(avatar, address, True)
        raise Reply(550, "5.7.1", f"From: header address {address} not allowed for user "
                    f"{avatar.user.username}")

    def _refused(self, avatar, address: str, header: bool) -> None:
        """Tell the wrapped policy; its outcome does not change the reply."""
        if self._session is not None:
            maybeDeferred(self._session.senderRefused, avatar, address, header).addErrback(
                lambda f: log.failure("sender refusal notice failed", f))


def _quoted_in_scope(avatar, address: str) -> bool:
    """``"a b"@doe.com`` for a login that may send from doe.com: the local part, not the
    domain, is why it is refused (scopes hold plain addresses only)."""
    local, _, domain = address.rpartition("@")
    return local.startswith('"') and avatar.scope.allows(f"postmaster@{domain}")
