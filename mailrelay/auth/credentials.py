"""Credentials that carry the client's address, so checkers can log and throttle by IP."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.cred.credentials import IUsernamePassword
from zope.interface import Attribute, Interface, implementer


class IClientInfo(Interface):
    client_ip = Attribute("The client's IP address as text")
    tls = Attribute("True when the session is inside TLS")


@implementer(IUsernamePassword, IClientInfo)
@dataclass
class ClientUsernamePassword:
    """A username and password (from AUTH PLAIN or LOGIN) plus where they came from."""

    username: str
    password: str = field(repr=False)  # never in a log line or a traceback
    client_ip: str
    tls: bool

    def checkPassword(self, password: str) -> bool:
        import hmac

        return hmac.compare_digest(self.password.encode(), password.encode())


class IClientAddress(Interface):
    """Credentials for IP authentication: no password, only the client's address."""

    client_ip = Attribute("The client's IP address as text")


@implementer(IClientAddress)
@dataclass
class ClientAddress:
    client_ip: str


class ISenderAddress(Interface):
    """Credentials for address authentication: the envelope sender a client gave at MAIL
    FROM without logging in, and where it came from."""

    sender = Attribute("The envelope sender address")
    client_ip = Attribute("The client's IP address as text")


@implementer(ISenderAddress)
@dataclass
class SenderAddress:
    sender: str
    client_ip: str
