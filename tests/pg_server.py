"""A private PostgreSQL for the tests (Debian's package; never the system cluster):
``initdb`` in a temporary directory and ``postgres`` on a loopback port, run as the
``postgres`` system user (PostgreSQL refuses to run as root). Started and stopped by PID.
One server per test process; each test class takes a database of its own."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

NOT_INSTALLED = "Debian's postgresql is not installed (./test.sh installs it)"


def bindir() -> str | None:
    """The newest /usr/lib/postgresql/N/bin with initdb and postgres."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def installed() -> bool:
    return bindir() is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``user`` owns the data directory and runs the server: root hands it ``directory``,
    whose parents that user must be able to enter (the default, a new temporary
    directory, is made for it)."""

    def __init__(self, directory: Path | None = None, user: str = "postgres") -> None:
        self._tmp = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mailrelay-pg-")
            directory = Path(self._tmp.name)
        self.dir = Path(directory)
        self.data = self.dir / "data"
        self.user = user
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    def _as_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid}

    def start(self) -> None:
        bin_ = bindir()
        if bin_ is None:
            raise RuntimeError(NOT_INSTALLED)
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        subprocess.run([f"{bin_}/initdb", "-D", str(self.data), "-A", "trust", "-U",
                        "mailrelay", "-E", "UTF8", "--no-locale", "--no-sync"],
                       check=True, capture_output=True, timeout=120, **self._as_user())
        self.start_again()

    def start_again(self) -> None:
        """Start the server on its existing data directory (after a stop or a kill)."""
        bin_, log = bindir(), self.dir / "postgres.log"
        # fsync off: the tests' data need not survive a crash of the machine.
        with open(log, "ab") as errors:  # the child keeps its own copy of the file
            self.process = subprocess.Popen(
                [f"{bin_}/postgres", "-D", str(self.data), "-h", "127.0.0.1", "-p",
                 str(self.port), "-k", str(self.dir), "-c", "fsync=off", "-c",
                 "synchronous_commit=off", "-c", "full_page_writes=off", "-c",
                 "max_connections=200", "-c", "shared_buffers=16MB"],
                stdout=subprocess.DEVNULL, stderr=errors, **self._as_user())
        deadline = time.monotonic() + 30
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited {self.process.returncode}: "
                                   + log.read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise TimeoutError("postgres did not answer")
            time.sleep(0.05)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://mailrelay@127.0.0.1:{self.port}/{dbname}"

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def halt(self) -> None:
        """Stop the server, its data kept (``start_again`` brings it back)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: clients are let go
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        self.halt()
        if self._tmp is not None:
            shutil.rmtree(self._tmp.name, ignore_errors=True)
            self._tmp = None


_shared: PostgresServer | None = None


def shared_server() -> PostgresServer:
    """This test process's server, started at first use and stopped at exit."""
    global _shared
    if _shared is None:
        import atexit

        server = PostgresServer()
        server.start()
        atexit.register(server.stop)
        _shared = server
    return _shared


def private(case, timeout: float = 1.0):
    """A server of ``case``'s own (a test that takes the database away) and an open pool on
    it, both stopped when the test ends: ``(server, db)``."""
    from mailrelay.postgres.db import Database

    server = PostgresServer()
    server.start()
    case.addCleanup(server.stop)
    db = Database(server.dsn(), timeout=timeout)
    db.open()
    case.addCleanup(db.close)
    return server, db
