"""The listener side: a factory of submission sessions, and the TLS wrapping per listener."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailrelay.events import NO_EVENTS
from mailrelay.interfaces import ISpool, ISubmissionPolicy
from mailrelay.metrics import NO_LISTENER_METRICS
from mailrelay.model import Account, SmtpUser
from mailrelay.policy.sender import SenderPolicy
from mailrelay.smtp.server import SubmissionServer

TLS_MODES = ("starttls", "implicit", "none")


class SubmissionFactory(ServerFactory):
    """Settings shared by the sessions of one listener.

    ``tls_options``: an IOpenSSLServerConnectionCreator (ssl.CertificateOptions), used for
    STARTTLS when ``tls_mode`` is "starttls"; "implicit" listeners are wrapped in TLS by
    wrap_listener_factory (the session sees the TLS transport and offers no STARTTLS);
    "none" offers no TLS. ``plaintext_auth`` allows AUTH outside TLS. ``policy`` is an
    ISubmissionPolicy or None; the sessions hold it inside the sender checks
    (policy.sender.SenderPolicy, which ``verify_senders`` configures). ``envelope_fields``
    (user, recipients) gives the Envelope keyword arguments that depend on the user: the
    recipients at least (features.envelope.user_fields adds the features' settings); by
    default the client's recipients alone. Times are seconds (``idle_timeout`` between commands,
    ``data_timeout`` for a DATA phase, ``session_timeout`` for the time a connection spends
    outside transactions in total; 0 turns the last off); ``reactor`` gives the clock.
    ``open_sessions`` are the live sessions (a session leaves once its connection is gone
    and a commit it had in flight is done): what smtp/goodbye.py says goodbye to on stop.
    """

    protocol = SubmissionServer
    # Not "Starting factory <...SubmissionFactory object at 0x...>": twistd's "starting
    # on PORT" line names the listener.
    noisy = False
    metrics = NO_LISTENER_METRICS  # the listener's IListenerMetrics (service.py sets it)
    events = NO_EVENTS  # the relay's IEventSink (service.py sets it)

    def __init__(
        self,
        portal,
        spool,
        hostname: str,
        tls_options,
        tls_mode: str,
        plaintext_auth: bool,
        max_message_size: int = 50 * 2**20,
        max_recipients: int = 400,
        max_messages_per_connection: int = 2500,
        idle_timeout: float = 300.0,
        data_timeout: float = 600.0,
        reactor=None,
        policy=None,
        session_timeout: float = 3600.0,
        verify_senders: bool = False,
        envelope_fields: Callable[[SmtpUser, list[str], Account | None], dict] | None = None,
    ) -> None:
        if tls_mode not in TLS_MODES:
            raise ValueError(f"tls_mode must be one of {', '.join(TLS_MODES)}, not {tls_mode!r}")
        if tls_mode != "none" and tls_options is None:
            raise ValueError(f"tls_mode {tls_mode!r} needs tls_options")
        if not ISpool.providedBy(spool):
            raise TypeError(f"{spool!r} does not provide ISpool")
        if policy is not None and not ISubmissionPolicy.providedBy(policy):
            raise TypeError(f"{policy!r} does not provide ISubmissionPolicy")
        if reactor is None:
            from twisted.internet import reactor
        self.portal = portal
        self.spool = spool
        self.hostname = hostname
        self.tls_options = tls_options
        self.tls_mode = tls_mode
        self.plaintext_auth = plaintext_auth
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.max_messages_per_connection = max_messages_per_connection
        self.idle_timeout = idle_timeout
        self.data_timeout = data_timeout
        self.session_timeout = session_timeout
        self.reactor = reactor
        self.policy = SenderPolicy(policy, verify_senders)
        self.envelope_fields = envelope_fields or _recipients_only
        self.open_sessions: set[SubmissionServer] = set()
        self._emptied: list[Deferred] = []

    def session_ended(self, session: SubmissionServer) -> None:
        self.open_sessions.discard(session)
        if not self.open_sessions:
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def emptied(self) -> Deferred:
        """Fires once no session of this listener is left."""
        d = Deferred()
        if self.open_sessions:
            self._emptied.append(d)
        else:
            d.callback(None)
        return d

    def buildProtocol(self, addr) -> SubmissionServer:
        return self.protocol(self)


def _recipients_only(user: SmtpUser, recipients: list[str], account: Account | None) -> dict:
    return {"recipients": list(recipients)}


def wrap_listener_factory(
    factory: SubmissionFactory, tls_mode: str, tls_options, endpoint: str = ""
) -> ServerFactory:
    """The factory to listen with: wrapped in TLS for an implicit-TLS listener, unless its
    ``endpoint`` string is an ``ssl:`` endpoint, which does the TLS itself."""
    if tls_mode == "implicit" and not endpoint.startswith("ssl:"):
        return TLSMemoryBIOFactory(tls_options, False, factory)
    return factory
