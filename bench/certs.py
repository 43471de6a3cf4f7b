"""The certificate both servers present: self-signed, ECDSA P-256 (default) or RSA-2048."""

from __future__ import annotations

import os

from mailrelay.tls import make_self_signed

KEY_TYPES = {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"}


def make_certificate(directory: str, key_type: str = "ecdsa",
                     hostname: str = "bench.localdomain") -> tuple[str, str]:
    """Write cert.pem and key.pem (key mode 0600) with the relay's own self-signed
    certificate maker; returns their paths."""
    if key_type not in KEY_TYPES:
        raise ValueError(f"key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    make_self_signed(cert_path, key_path, hostname, key_type, days=30)
    return cert_path, key_path
