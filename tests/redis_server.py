"""A private redis-server for the tests (Debian's package; never the system service):
a unix socket in a temporary directory, optionally a loopback TCP port with a password
and a loopback TLS port (Debian builds redis-server with TLS), nothing saved to disk.
A primary's replica (``replicaof``) and the Sentinel watching them (``Sentinel``, Debian's
redis-server run with ``--sentinel``) for the failover tests. Started and stopped by PID."""

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
                 client_certificates: bool = False,
                 replicaof: tuple[str, int] | None = None) -> None:
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
        self.replicaof = replicaof
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> None:
        lines = [f"port {self.port}", "bind 127.0.0.1", f"unixsocket {self.socket}",
                 "unixsocketperm 700", 'save ""', "appendonly no", f"dir {self.dir}",
                 "protected-mode no", "daemonize no", f"logfile {self.dir / 'redis.log'}"]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.replicaof:
            lines.append(f"replicaof {self.replicaof[0]} {self.replicaof[1]}")
        lines.append("repl-diskless-sync-delay 0")  # a replica's first copy at once
        if self.tls_port and self.tls:
            cert, key, ca = self.tls
            lines += [f"tls-port {self.tls_port}", f"tls-cert-file {cert}",
                      f"tls-key-file {key}", f"tls-ca-cert-file {ca}",
                      f"tls-auth-clients {'yes' if self.client_certificates else 'no'}"]
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.process = _run(conf)
        _answering(self.process, self.ping, self.dir / "redis.log", "redis-server")

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
        _stop(self.process)
        self.process = None

    def wait_for_sync(self, timeout: float = 30) -> None:
        """Until this replica has its primary's data and follows it."""
        deadline = time.monotonic() + timeout
        while "master_link_status:up" not in self.command("INFO", "replication"):
            if time.monotonic() > deadline:
                raise TimeoutError("the replica did not sync")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: gone at once, as a crashed or unplugged server."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


class Sentinel:
    """One sentinel on a loopback port watching ``master`` at ``primary`` (quorum 1, down
    after 500 ms, failover timeout 2 s), optionally with its own ``password``."""

    def __init__(self, directory: Path, port: int, master: str, primary: tuple[str, int],
                 password: str = "", auth: str = "") -> None:
        """``auth``: the password of the primary and its replicas."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.master, self.primary = port, master, primary
        self.password, self.auth = password, auth
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        m = self.master
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
                 "protected-mode no", "daemonize no", f"logfile {self.dir / 'sentinel.log'}",
                 f"sentinel monitor {m} {self.primary[0]} {self.primary[1]} 1",
                 f"sentinel down-after-milliseconds {m} 500",
                 f"sentinel failover-timeout {m} 2000"]
        if self.auth:
            lines.append(f"sentinel auth-pass {m} {self.auth}")
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf = self.dir / "sentinel.conf"  # Sentinel rewrites it with what it learns
        conf.write_text("\n".join(lines) + "\n")
        self.process = _run(conf, "--sentinel")
        _answering(self.process, lambda: self.command("PING") == "PONG",
                   self.dir / "sentinel.log", "sentinel")

    def command(self, *args: str) -> str:
        env = dict(os.environ, REDISCLI_AUTH=self.password) if self.password else None
        try:
            return subprocess.run([shutil.which("redis-cli") or "/usr/bin/redis-cli", "-h",
                                   "127.0.0.1", "-p", str(self.port), *args],
                                  capture_output=True, text=True, timeout=10,
                                  env=env).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def primary_port(self) -> int | None:
        answer = self.command("SENTINEL", "get-master-addr-by-name", self.master).split()
        return int(answer[1]) if len(answer) == 2 else None

    def wait_for_replicas(self, count: int = 1, timeout: float = 30) -> None:
        """Until Sentinel knows ``count`` replicas (it learns them from the primary's
        INFO), which a failover needs."""
        deadline = time.monotonic() + timeout
        while self.command("SENTINEL", "replicas", self.master).count("flags") < count:
            if time.monotonic() > deadline:
                raise TimeoutError("Sentinel did not find the replica")
            time.sleep(0.1)

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


def failover_set(directory: Path, master: str, password: str = "",
                 sentinel_password: str = "") -> tuple[RedisServer, RedisServer, Sentinel]:
    """A primary (``password``), its replica, synced, and a sentinel (its own
    ``sentinel_password``) that knows them, on loopback ports; the caller stops them
    (``stop_all``)."""
    from tests.harness import free_port

    directory = Path(directory)
    primary = RedisServer(directory / "primary", port=free_port(), password=password)
    replica = RedisServer(directory / "replica", port=free_port(), password=password,
                          replicaof=("127.0.0.1", primary.port))
    sentinel = Sentinel(directory / "sentinel", free_port(), master,
                        ("127.0.0.1", primary.port), password=sentinel_password, auth=password)
    started: list = []
    try:
        for server in (primary, replica, sentinel):
            server.start()
            started.append(server)
        replica.wait_for_sync()
        sentinel.wait_for_replicas(1)
    except BaseException:
        stop_all(started)
        raise
    return primary, replica, sentinel


def stop_all(servers) -> None:
    for server in servers:
        server.stop()


def _run(conf: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("redis-server") or REDIS_SERVER, str(conf), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _answering(process: subprocess.Popen, ping, logfile: Path, name: str) -> None:
    """Until ``ping()`` is true (bounded: 20 s); the log when the server exited first."""
    deadline = time.monotonic() + 20
    while not ping():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited {process.returncode}: "
                               + logfile.read_text(errors="replace"))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not answer")
        time.sleep(0.02)


def _stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

