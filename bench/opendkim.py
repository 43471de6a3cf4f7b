"""A private OpenDKIM milter for the bench's Postfix: its own config file, key table and
signing table in a temporary directory, an RSA-2048 key made by ``opendkim-genkey`` for the
bench's sender domain, listening on a loopback port chosen at run time
(``inet:PORT@127.0.0.1``). The system opendkim (``/etc/opendkim.conf``) is never used: the
daemon is started in the foreground with ``-x`` naming this config and stopped by its PID.

It signs the way mailrelay does (README "DKIM signing"): relaxed/relaxed, SHA-256, the same
header fields signed and oversigned; ``Mode s`` (sign only), mail from 127.0.0.1 is
internal.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time

from bench import procs

OPENDKIM = "/usr/sbin/opendkim"
GENKEY = "/usr/sbin/opendkim-genkey"
SELECTOR = "bench"
# As mailrelay signs them (mailrelay/dkim.py SIGNED), each once more than it occurs.
HEADERS = "From,To,Subject,Date,Message-ID,MIME-Version,Content-Type"


def available() -> bool:
    return all(os.access(p, os.X_OK) for p in (OPENDKIM, GENKEY))


class OpenDKIMInstance:
    """One opendkim under ``base`` signing mail from ``domain``; ``milter`` is the socket
    spec for Postfix's ``smtpd_milters``."""

    def __init__(self, base: str, domain: str) -> None:
        self.base = os.path.abspath(base)
        self.domain = domain
        self.port = procs.free_port()
        self.config = os.path.join(self.base, "opendkim.conf")
        self.key_file = os.path.join(self.base, f"{SELECTOR}.private")
        self.log_file = os.path.join(self.base, "opendkim.log")
        self.proc: subprocess.Popen | None = None

    @property
    def milter(self) -> str:
        return f"inet:{procs.HOST}:{self.port}"

    def configure(self) -> None:
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        if not os.path.exists(self.key_file):
            subprocess.run([GENKEY, "-b", "2048", "-h", "sha256", "-d", self.domain,
                            "-s", SELECTOR, "-D", self.base], check=True, timeout=120)
        user = "opendkim" if procs.has_user("opendkim") and os.geteuid() == 0 else ""
        if user:  # as Debian runs it; the key must be its own and private
            os.chown(self.key_file, pwd.getpwnam(user).pw_uid, -1)
        os.chmod(self.key_file, 0o600)
        key_name = f"{SELECTOR}._domainkey.{self.domain}"
        key_table = os.path.join(self.base, "key.table")
        signing_table = os.path.join(self.base, "signing.table")
        with open(key_table, "w") as f:
            f.write(f"{key_name} {self.domain}:{SELECTOR}:{self.key_file}\n")
        with open(signing_table, "w") as f:
            f.write(f"*@{self.domain} {key_name}\n")
        settings = {
            "Syslog": "no",
            "Background": "no",
            "Mode": "s",
            "Socket": f"inet:{self.port}@{procs.HOST}",
            "PidFile": os.path.join(self.base, "opendkim.pid"),
            "KeyTable": f"file:{key_table}",
            "SigningTable": f"refile:{signing_table}",
            "InternalHosts": procs.HOST,
            "Canonicalization": "relaxed/relaxed",
            "SignatureAlgorithm": "rsa-sha256",
            "SignHeaders": HEADERS,
            "OversignHeaders": HEADERS,
            "UMask": "007",
            # The key file is the milter's own, mode 0600, but it lies under the temp
            # dir (/tmp: world-writable, sticky), which opendkim would refuse outright.
            "RequireSafeKeys": "false",
            **({"UserID": user} if user else {}),
        }
        with open(self.config, "w") as f:
            f.writelines(f"{k} {v}\n" for k, v in settings.items())

    def record(self) -> str:
        """The DNS TXT value of the key (``v=DKIM1; k=rsa; p=...``)."""
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        from mailrelay.dkim import public_key_text

        with open(self.key_file, "rb") as f:
            private = load_pem_private_key(f.read(), None)
        return f"v=DKIM1; k=rsa; p={public_key_text(private)}"

    def start(self, timeout: float = 20) -> None:
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen([OPENDKIM, "-f", "-x", self.config], stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=procs.die_with_this_process())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opendkim exited ({self.proc.returncode}): "
                                   f"{procs.tail(self.log_file, 5).strip()}")
            try:
                socket.create_connection((procs.HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"opendkim did not listen on {self.port} within {timeout:.0f}s")

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None:
            procs.terminate(self.proc, timeout)
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def cpu(self) -> float:
        """CPU seconds used so far by the milter (all its threads)."""
        return procs.tree_cpu(self.pid) if self.pid else 0.0
