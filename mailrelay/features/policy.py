"""The accept path of the per-user features, as a layer around the submission policy.

The session tells its policy when a message is durable (``accepted``), and the sender
checks (policy/sender.py) tell it when they refuse a sender (``senderRefused``); this
wrapper adds the statistics and the archive copy there, so the session itself knows
nothing of the features.
"""

from __future__ import annotations

from functools import partial

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailrelay.features.hooks import MessageFeatures
from mailrelay.interfaces import ISessionPolicy, ISubmissionPolicy


@implementer(ISubmissionPolicy)
class FeaturePolicy:
    def __init__(self, policy, features: MessageFeatures, spool) -> None:
        self.policy = policy
        self.features = features
        self.spool = spool

    def connect(self, client_ip: str):
        session = self.policy.connect(client_ip)
        if isinstance(session, Deferred):
            return session.addCallback(_FeatureSession, self)
        return _FeatureSession(session, self)


@implementer(ISessionPolicy)
class _FeatureSession:
    """One connection's policy, with the feature hooks added; everything else is the
    wrapped policy's."""

    def __init__(self, session, outer: FeaturePolicy) -> None:
        self._session = session
        self._outer = outer

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def senderRefused(self, avatar, address: str, header: bool):
        result = self._session.senderRefused(avatar, address, header)
        self._outer.features.rejected(avatar.user)
        return result

    def accepted(self, avatar, envelope):
        result = self._session.accepted(avatar, envelope)  # the rate limit's commit first
        outer = self._outer
        outer.features.accepted(envelope, avatar.user, partial(outer.spool.open_body, envelope.id))
        return result
