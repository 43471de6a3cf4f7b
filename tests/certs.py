"""Certificates made by the tests: a private CA and leaf certificates it signs."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """A throwaway CA; ``issue()`` writes a leaf certificate and key for the given names."""

    __test__ = False  # a helper, not a test class

    def __init__(self, directory: Path, name: str = "mailrelay test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.directory / "ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, hostname: str, ips: tuple[str, ...] = ("127.0.0.1", "::1"),
        expired: bool = False, self_signed: bool = False, chain: bool = False,
        names: tuple[str, ...] = (),
    ) -> tuple[Path, Path]:
        """A leaf certificate for ``hostname`` signed by the CA (by its own key with
        ``self_signed``; already expired with ``expired``), written as ``hostname.pem``
        (followed by the CA's certificate with ``chain``, as servers send their chain)
        and ``hostname.key``; ``names``: more DNS names it is valid for."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alt = [x509.DNSName(n) for n in (hostname, *names)]
        alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        start, end = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) \
            if expired else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=30))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hostname))
            .issuer_name(_name(hostname) if self_signed else self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key if self_signed else self.key, hashes.SHA256())
        )
        name = hostname + ("-expired" if expired else "") + ("-self" if self_signed else "")
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}.key"
        pem = cert.public_bytes(serialization.Encoding.PEM)
        if chain:
            pem += self.cert.public_bytes(serialization.Encoding.PEM)
        cert_path.write_bytes(pem)
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path
