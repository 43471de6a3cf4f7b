"""A real validating resolver for tests: Debian's unbound on 127.0.0.1, with a config of
its own in a temporary directory, stub zones pointing at a DNS server of the tests and a
trust anchor per signed zone. Started and stopped by PID, never as the system service.

    resolver = Unbound(directory, stubs={"signed.test": ("127.0.0.1", port)},
                       anchors=["signed.test. DNSKEY 257 3 13 ..."],
                       insecure=["plain.test"])
    resolver.start()            # resolver.address == ("127.0.0.1", port)
    resolver.stop()
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

UNBOUND = "/usr/sbin/unbound"
START_TIMEOUT = 20.0  # seconds


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (unbound listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


class Unbound:
    def __init__(self, directory: Path, stubs: dict[str, tuple[str, int]],
                 anchors: list[str] = (), insecure: list[str] = ()) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.address = ("127.0.0.1", self.port)
        self.process: subprocess.Popen | None = None
        lines = ["server:",
                 "  interface: 127.0.0.1", f"  port: {self.port}",
                 "  do-ip6: no", "  do-daemonize: no", "  use-syslog: no",
                 f"  logfile: \"{self.directory / 'unbound.log'}\"", "  verbosity: 1",
                 "  val-log-level: 2",
                 "  username: \"\"", "  chroot: \"\"", f"  directory: \"{self.directory}\"",
                 "  pidfile: \"\"", "  access-control: 127.0.0.0/8 allow",
                 "  do-not-query-localhost: no",  # the stubs are on loopback
                 "  qname-minimisation: no", "  prefetch: no",
                 "  module-config: \"validator iterator\"",
                 # unbound answers NXDOMAIN for test. itself (RFC 6761) unless told
                 "  local-zone: \"test.\" nodefault"]
        lines += [f"  trust-anchor: \"{a}\"" for a in anchors]
        lines += [f"  domain-insecure: \"{z}\"" for z in insecure]
        lines += ["remote-control:", "  control-enable: no"]
        for zone, (host, port) in stubs.items():
            lines += ["stub-zone:", f"  name: \"{zone}\"", f"  stub-addr: {host}@{port}"]
        self.config = self.directory / "unbound.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        binary = shutil.which("unbound") or UNBOUND
        self.process = subprocess.Popen([binary, "-d", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:  # bounded: ready once it answers
            if self.process.poll() is not None:
                raise RuntimeError(f"unbound exited: {self.process.stderr.read().decode()}"
                                   f"{self.log()}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"unbound did not start: {self.log()}")

    def _answers(self) -> bool:
        import dns.message
        import dns.query

        try:
            dns.query.udp(dns.message.make_query("localhost.", "A"), "127.0.0.1",
                          timeout=0.2, port=self.port)
        except Exception:
            return False
        return True

    def log(self) -> str:
        path = self.directory / "unbound.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stderr:
            process.stderr.close()
