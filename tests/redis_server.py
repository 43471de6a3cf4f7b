"""A private redis-server for the tests (Debian's package; never the system service):
a unix socket in a temporary directory, optionally a loopback TCP port with a password
and a loopback TLS port (Debian builds redis-server with TLS), nothing saved to disk.
Started and stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

REDIS_SERVER = "/usr/bin/redis-server"
NOT_INSTALLED = "Debian's redis-server is not installed (./test.sh installs it)"


def installed() -> bool:
    return os.path.exists(REDIS_SERVER) or bool(shutil.which("redis-server"))


class RedisServer:
    def __init__(self, directory: Path, port: int = 0, password: str = "",
                 tls_port: int = 0, tls: tuple[Path, Path, Path] | None = None,
                 client_certificates: bool = False) -> None:
        """``tls``: the server's certificate, its key and the CA it trusts for client
        certificates, which it asks for with ``client_certificates``."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.dir / "redis.sock")
        self.port = port
        self.password = password
        self.tls_port = tls_port
        self.tls = tls
        self.client_certificates = client_certificates
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> None:
        lines = [f"port {self.port}", "bind 127.0.0.1", f"unixsocket {self.socket}",
                 "unixsocketperm 700", 'save ""', "appendonly no", f"dir {self.dir}",
                 "protected-mode no", "daemonize no", f"logfile {self.dir / 'redis.log'}"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        if self.tls_port and self.tls:
            cert, key, ca = self.tls
            lines += [f"tls-port {self.tls_port}", f"tls-cert-file {cert}",
                      f"tls-key-file {key}", f"tls-ca-cert-file {ca}",
                      f"tls-auth-clients {'yes' if self.client_certificates else 'no'}"]
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen([shutil.which("redis-server") or REDIS_SERVER,
                                         str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.process.returncode}: "
                                   + (self.dir / "redis.log").read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer")
            time.sleep(0.02)

    def command(self, *args: str) -> str:
        """One command through redis-cli over the unix socket; its reply as text."""
        env = dict(os.environ, REDISCLI_AUTH=self.password) if self.password else None
        return subprocess.run([shutil.which("redis-cli") or "/usr/bin/redis-cli", "-s",
                               self.socket, *args], capture_output=True, text=True,
                              timeout=10, env=env).stdout.strip()

    def ping(self) -> bool:
        try:
            return os.path.exists(self.socket) and self.command("PING") == "PONG"
        except (OSError, subprocess.TimeoutExpired):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

