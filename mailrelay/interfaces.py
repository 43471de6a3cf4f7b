"""The seams of mailrelay: listener -> session -> policy -> spool -> delivery.

Each interface has one job and can be swapped (file or LDAP directory; MX or smarthost
routing) without touching the code on the other side.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class DirectoryUnavailable(Exception):
    """The directory cannot answer now (LDAP down, timeout): a temporary failure (4xx)."""


class IDirectory(Interface):
    """Where SMTP users and accounts live. Every method returns a Deferred.

    Implementations must never block the reactor (hashing, LDAP calls go to threads).
    """

    writable = Attribute("True when mailrelay-admin may change users here (file); False for LDAP")

    def authenticate(username: str, password: str):
        """Verify a password. Fires with the SmtpUser.

        Errbacks with twisted.cred.error.UnauthorizedLogin for an unknown user and for a
        wrong password alike (never revealing which), DirectoryUnavailable when it cannot
        tell now.
        """

    def getUser(username: str):
        """Fires with the SmtpUser or None (no password check)."""

    def getAccount(name: str):
        """Fires with the Account or None."""

    def listUsers(account: str | None = None):
        """Fires with a list of SmtpUser, sorted by username."""

    def listAccounts():
        """Fires with a list of Account, sorted by name."""


class IIncomingMessage(Interface):
    """A message being received into the spool; nothing is queued until commit() fires."""

    id = Attribute("The queue id, known before the body arrives (for Received: and logs)")
    size = Attribute("Bytes of body written so far")

    def write(data: bytes) -> None:
        """Append body bytes: canonical CRLF lines, not dot-stuffed."""

    def commit():
        """Fsync the file, rename it into the queue, fsync the directory (batched with other
        commits). Fires with the queue id once durable; only then may the 250 be sent.
        Errbacks (e.g. disk full) leave nothing in the queue."""

    def abort() -> None:
        """Discard the message (client vanished, over size, policy refusal)."""


class ISpool(Interface):
    """The durable queue (see mailrelay/spool/README.md for the on-disk layout)."""

    def create(envelope):
        """Start a new message for ``envelope`` (a model.Envelope whose id is filled in by
        the spool when empty). Returns an IIncomingMessage."""


class IRouter(Interface):
    """Chooses where mail for a recipient domain goes (MX lookup, smarthost, per-domain route)."""

    def route(domain: str):
        """Fires with a list of delivery.Hop in the order to try; errbacks with
        delivery.PermanentRouteError (null MX, NXDOMAIN) or a temporary error."""


class ISubmissionPolicy(Interface):
    """Checks applied by the session at each step. Each method returns None to allow or
    raises (or errbacks with) smtp.reply.Reply carrying code, enhanced status and text.
    May return a Deferred."""

    def connect(peer_host: str):
        """A new connection from ``peer_host``."""

    def mailFrom(avatar, sender: str):
        """MAIL FROM by an authenticated (or IP-authenticated) avatar."""

    def rcptTo(avatar, recipient: str, count: int):
        """One more RCPT; ``count`` recipients already accepted."""

    def headerFrom(avatar, addresses: list[str]):
        """The From: header's addresses, checked after the headers have arrived."""

    def accepted(avatar, envelope):
        """A message was committed to the spool (for counters)."""
