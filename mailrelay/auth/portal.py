"""The Cred portal the SMTP session logs in through."""

from __future__ import annotations

from twisted.cred.portal import Portal

from mailrelay.auth.checkers import PasswordChecker
from mailrelay.auth.realm import SubmissionRealm


def make_portal(directory, cache_ttl: float = 60.0, clock=None) -> Portal:
    """A portal over ``directory`` (an IDirectory) with the password checker; ``cache_ttl``
    is ``[directory] login_cache_ttl`` (0 turns the login cache off)."""
    return Portal(SubmissionRealm(directory), [PasswordChecker(directory, cache_ttl, clock)])
