"""TLS for the listeners: load the configured certificate, or make a self-signed one.

On first start with no certificate configured, a self-signed certificate for the relay's
hostname is written to <data_dir>/tls/ (key mode 0600) so that STARTTLS and implicit TLS
work out of the box; a sysadmin replaces it by setting [tls] certificate and key.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.logger import Logger

from mailrelay.files import save_file

log = Logger()


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


def server_options(
    cert_path: str, key_path: str, generate: bool, hostname: str, key_type: str = "ecdsa"
) -> ssl.CertificateOptions:
    """CertificateOptions (TLS 1.2 minimum, session tickets on) for the listeners."""
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
    return ssl.CertificateOptions(
        # pyOpenSSL takes cryptography objects directly (its own wrappers are deprecated).
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        enableSessionTickets=True,
    )
