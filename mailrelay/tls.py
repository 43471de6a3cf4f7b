"""TLS for the listeners: load the configured certificate, or make a self-signed one.

On first start with no certificate configured, a self-signed certificate for the relay's
hostname is written to <data_dir>/tls/ (key mode 0600) so that STARTTLS and implicit TLS
work out of the box; a sysadmin replaces it by setting [tls] certificate and key.

The listeners (SMTP and the panel's HTTPS) offer TLS 1.2 and 1.3; in TLS 1.2 only the
``[tls] ciphers`` suites, by default AEAD ones with forward secrecy (no CBC: LUCKY13).
A client offering ALPN protocols the listener does not speak gets TLS without ALPN, and a
handshake that fails logs one line naming the peer and OpenSSL's reason.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import weakref

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.config import SCHEMA
from mailrelay.files import save_file
from mailrelay.proxyproto import ProxyHeaderReader

log = Logger()

DEFAULT_CIPHERS: str = SCHEMA["tls"]["ciphers"][1]


class TLSSetupError(Exception):
    """The certificate or key cannot be read or made; the text says which file and why."""


def make_self_signed(
    cert_path: str, key_path: str, hostname: str, key_type: str = "ecdsa", days: int = 825
) -> None:
    """Write a self-signed certificate for ``hostname`` (and localhost, 127.0.0.1, ::1),
    valid ``days`` from five minutes ago: 825 days is the most Apple's clients accept."""
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(n) for n in dict.fromkeys([hostname.lower(), "localhost"])]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    save_file(key_path, key_pem, 0o600)
    save_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def tls12_ciphers(ciphers: str) -> list[str]:
    """The TLS 1.2 suites an OpenSSL cipher string leaves the listeners (TLS 1.3 has its
    own, all AEAD); raises ValueError when there are none."""
    try:
        options = ssl.CertificateOptions(
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers))
        names = SSL.Connection(options.getContext()).get_cipher_list()
    except (ValueError, SSL.Error):
        names = []
    names = [n for n in names if not n.startswith("TLS_")]
    if not names:
        raise ValueError(f"{ciphers!r} leaves no TLS 1.2 cipher (default: {DEFAULT_CIPHERS})")
    return names


class ServerOptions(ssl.CertificateOptions):
    """CertificateOptions whose connections answer ALPN themselves and log a failed
    handshake (see ServerConnections). ``use`` swaps in the certificate, key and ciphers
    of other options for the handshakes that follow (a reload, mailrelay/reload.py)."""

    _current: ServerOptions | None = None

    def use(self, other: ServerOptions) -> None:
        """New handshakes get ``other``'s context; a connection keeps the one it began
        with, so no session is dropped."""
        self._current = other

    def getContext(self) -> SSL.Context:
        if self._current is not None:
            return self._current.getContext()
        return super().getContext()

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return _ServerConnection(_own_alpn(self.getContext()), tlsProtocol)


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnections:
    """The server connections of any Twisted TLS options (an ``ssl:`` endpoint's), with
    the relay's own ALPN answer and a log line for a failed handshake.

    When no offered protocol overlaps, Twisted's ALPN callback answers with an empty
    protocol, which OpenSSL turns into a fatal internal_error alert: every client whose TLS
    stack offers ALPN (Android's and Go's, browsers) would be refused. Here such a
    handshake completes without ALPN (RFC 7301 section 3.2 lets a server ignore it), and a
    factory that negotiates protocols (the panel's Site: http/1.1) still gets its own.
    Only public interfaces are used: the options' getContext, and the
    IOpenSSLServerConnectionCreator method Twisted's TLS layer calls for each connection.
    """

    def __init__(self, options) -> None:
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return _ServerConnection(_own_alpn(self.options.getContext()), tlsProtocol)


_OWN_ALPN: weakref.WeakSet[SSL.Context] = weakref.WeakSet()


def _own_alpn(context: SSL.Context) -> SSL.Context:
    if context not in _OWN_ALPN:
        # Replaces Twisted's callback; pyOpenSSL allows it until a connection is made, and
        # connections are made here only.
        context.set_alpn_select_callback(_select_protocol)
        _OWN_ALPN.add(context)
    return context


class _ServerConnection(SSL.Connection):
    """One listener connection: knows its TLS protocol (for ALPN and the log line)."""

    def __init__(self, context: SSL.Context, tls_protocol) -> None:
        super().__init__(context)
        self.tls_protocol = tls_protocol

    def protocols(self) -> list[bytes]:
        """What the listener speaks over ALPN, in its order of preference."""
        wrapped = getattr(self.tls_protocol.factory, "wrappedFactory", None)
        negotiating = IProtocolNegotiationFactory(wrapped, None)
        return list(negotiating.acceptableProtocols()) if negotiating is not None else []

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except SSL.WantReadError:
            raise
        except SSL.Error as e:
            peer = _client(self.tls_protocol)
            log.info("TLS handshake with {peer} failed: {reason}",
                     peer=peer, reason=ssl_reason(e))
            raise


def _client(tls_protocol) -> str:
    """The client's address. STARTTLS slides the TLS layer in under the socket's protocol:
    behind a PROXY header that is the header's reader, which knows the client, while the
    socket knows only the load balancer."""
    inner = getattr(tls_protocol, "wrappedProtocol", None)
    source = inner if isinstance(inner, ProxyHeaderReader) else tls_protocol.transport
    return getattr(source.getPeer(), "host", "?") if source is not None else "?"


def _select_protocol(connection: SSL.Connection, offered: list[bytes]):
    if isinstance(connection, _ServerConnection):
        for protocol in connection.protocols():
            if protocol in offered:
                return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def ssl_reason(error: SSL.Error) -> str:
    """OpenSSL's reason ("no shared cipher", "tlsv1 alert unknown ca", ...), or the
    socket-level one ("Unexpected EOF")."""
    if isinstance(error, SSL.SysCallError):
        return str(error.args[-1]) if error.args else "connection lost"
    details = error.args[0] if error.args else []
    if isinstance(details, list):
        reasons = [str(d[-1]) for d in details if isinstance(d, tuple) and d]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return str(error) or type(error).__name__


def server_options(
    cert_path: str, key_path: str, generate: bool, hostname: str, key_type: str = "ecdsa",
    ciphers: str = DEFAULT_CIPHERS,
) -> ServerOptions:
    """ServerOptions (TLS 1.2 minimum, ``ciphers`` in TLS 1.2, session tickets on) for the
    listeners."""
    if generate and not (os.path.exists(cert_path) and os.path.exists(key_path)):
        make_self_signed(cert_path, key_path, hostname, key_type)
        log.info("made a self-signed certificate for {hostname} in {path}",
                 hostname=hostname, path=cert_path)
    try:
        with open(cert_path, "rb") as f:
            chain = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as e:
        raise TLSSetupError(f"{cert_path}: cannot read certificate: {e}")
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise TLSSetupError(f"{key_path}: cannot read private key: {e}")
    if chain[0].public_key().public_numbers() != key.public_key().public_numbers():
        raise TLSSetupError(f"{key_path}: the key does not match the certificate {cert_path}")
    return ServerOptions(
        # pyOpenSSL takes cryptography objects directly (its own wrappers are deprecated).
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        enableSessionTickets=True,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers),
    )


def client_options(host: str, ca_file: str = "", certificate: str = "", key: str = ""):
    """Options for a verified TLS client connection (to Redis, mailrelay/cluster/): the
    server's chain checked against the PEM certificates of ``ca_file`` (the system's trust
    roots when empty) and its name against ``host``, a DNS name or an IP address, by
    service-identity (Twisted's client TLS); ``certificate`` and ``key`` (PEM), when given,
    are presented to a server that asks for a client certificate. Raises TLSSetupError
    naming a file that cannot be read."""
    trust = ssl.platformTrust()
    if ca_file:
        try:
            with open(ca_file, "rb") as f:
                roots = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError) as e:
            raise TLSSetupError(f"{ca_file}: cannot read CA certificates: {e}")
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in roots])
    client = None
    if certificate or key:
        if not (certificate and key):
            raise TLSSetupError("a client certificate needs both the certificate and its key")
        pem = b""
        for path, what in ((certificate, "certificate"), (key, "private key")):
            try:
                with open(path, "rb") as f:
                    pem += f.read() + b"\n"
            except OSError as e:
                raise TLSSetupError(f"{path}: cannot read {what}: {e}")
        try:
            client = ssl.PrivateCertificate.loadPEM(pem)
        except Exception as e:  # pyOpenSSL's errors, a key that does not match
            raise TLSSetupError(f"{certificate}, {key}: cannot use them as a client "
                                f"certificate: {e}")
    return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)
