"""Two independent DKIM verifiers for the tests: dkimpy, and Debian's opendkim-testmsg
(libopendkim). opendkim-testmsg asks the system resolver, on port 53 of the nameserver in
/etc/resolv.conf: it runs in a network and mount namespace of its own (unshare, as root
of a user namespace) where /etc/resolv.conf names 127.0.0.1 and tests/dns_server.py
answers on port 53 of that namespace's loopback. Nothing leaves the namespace."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import dkim
from harness import ROOT, env


def dkimpy_verify(message: bytes, records: dict[str, str]) -> list[bool]:
    """Each DKIM-Signature of ``message``, top first, checked by dkimpy against
    ``records`` (TXT name -> value)."""
    def dnsfunc(name, timeout=5):
        return records.get(name.decode().rstrip("."), "").encode() or None

    d = dkim.DKIM(message)
    count = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
    return [d.verify(idx=i, dnsfunc=dnsfunc) for i in range(count)]


def opendkim_verify(message: bytes, records: dict[str, str]) -> subprocess.CompletedProcess:
    """opendkim-testmsg on ``message`` (it checks the first signature); exit status 0
    when it verifies."""
    with tempfile.TemporaryDirectory(prefix="mailrelay-dkim-") as tmp:
        t = Path(tmp)
        (t / "msg").write_bytes(message)
        (t / "zone.json").write_text(json.dumps({n: [f"TXT {v}"] for n, v in records.items()}))
        (t / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        q = shlex.quote
        script = f"""
set -e
ip link set lo up
mount --bind {q(str(t / 'resolv.conf'))} /etc/resolv.conf
{q(sys.executable)} {q(str(ROOT / 'tests' / 'dns_server.py'))} --port 53 \\
    --zone {q(str(t / 'zone.json'))} --port-file {q(str(t / 'port'))} &
dns=$!
i=0
while [ ! -e {q(str(t / 'port'))} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
set +e
opendkim-testmsg -C < {q(str(t / 'msg'))}
status=$?
kill $dns
exit $status
"""
        return subprocess.run(["unshare", "--map-root-user", "--net", "--mount", "sh", "-c",
                               script], capture_output=True, text=True, timeout=60, env=env())
