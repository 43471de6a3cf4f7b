"""End-to-end harness: the real ``twistd -n mailrelay`` process, configured per test.

A test makes a ``Relay`` in its tmp_path, adds users with the real ``mailrelay-admin``,
starts the daemon, talks to it with real clients (smtplib, swaks) and stops it by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TempPaths:
    """For trial TestCases: mktemp() under the system's temporary directory (trial's
    default is the working directory), removed after the test."""

    def mktemp(self) -> str:
        base = tempfile.mkdtemp(prefix="mailrelay-test-")
        self.addCleanup(shutil.rmtree, base, True)
        return os.path.join(base, "t")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def twistd() -> str:
    """The twistd script installed beside this Python (the venv's, in ./test.sh)."""
    beside = Path(sys.executable).with_name("twistd")
    found = str(beside) if beside.exists() else shutil.which("twistd")
    assert found, "twistd is not installed"
    return found


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until true (bounded); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM,
                 timeout: float = 20.0) -> int:
    """Send ``sig`` to a process the test started and wait for it (bounded), killing it if
    it lingers; its exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def run_twistd(directory: Path, config: str | None = None,
               config_path: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``twistd -n mailrelay`` in ``directory`` until it exits (for configurations that
    stop startup): with ``config`` written to mailrelay.ini there, the file at
    ``config_path``, or neither (the embedded defaults)."""
    args = [twistd(), "-n", "--pidfile=", f"--logfile={Path(directory) / 'log'}", "mailrelay"]
    if config is not None:
        config_path = Path(directory) / "mailrelay.ini"
        config_path.write_text(config)
    if config_path is not None:
        args += ["--config", str(config_path)]
    return subprocess.run(args, capture_output=True, text=True, env=env(), cwd=directory,
                          timeout=60)


class Relay:
    """One mailrelay daemon under test."""

    def __init__(self, directory: Path, config: str = "", listeners: str | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.smtp_port = free_port()
        self.smtps_port = free_port()
        self.log_path = self.dir / "twistd.log"
        self.config_path = self.dir / "mailrelay.ini"
        if listeners is None:
            listeners = (
                f"[listener:smtp]\nendpoint = tcp:{self.smtp_port}:interface=127.0.0.1\n"
                "tls = starttls\n\n"
                f"[listener:smtps]\nendpoint = tcp:{self.smtps_port}:interface=127.0.0.1\n"
                "tls = implicit\n"
            )
        if "[admin]" not in config:  # the control panel only where a test asks for it
            config += "\n[admin]\nenabled = no\n"
        self.config_path.write_text(
            f"[server]\nhostname = relay.test\ndata_dir = {self.data}\n\n{listeners}\n{config}\n"
        )
        self.process: subprocess.Popen | None = None

    # ---- the admin command ----
    def admin(self, *args: str, input: str | None = None, check: bool = True):
        cmd = [sys.executable, "-m", "mailrelay.admin.cli", "-c", str(self.config_path), *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env(),
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {result.returncode}: {result.stderr}")
        return result

    def add_user(self, username: str, password: str, *options: str) -> None:
        self.admin("user", "add", username, "--password-stdin", *options, input=password + "\n")

    # ---- the daemon ----
    def start(self, wait: bool = True) -> None:
        cmd = [twistd(), "-n", "--pidfile=", f"--logfile={self.log_path}",
               "mailrelay", "--config", str(self.config_path)]
        self.stderr_path = self.dir / "twistd.stderr"
        with open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(cmd, env=env(), cwd=self.dir, stdout=err, stderr=err)
        if wait:
            wait_for(self._listening, what=f"mailrelay on port {self.smtp_port} ({self.stderr()})")

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"twistd exited {self.process.returncode}: {self.stderr()}")
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        code, self.process = stop_process(self.process, sig), None
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def stderr(self) -> str:
        path = getattr(self, "stderr_path", None)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- clients ----
    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.data / "tls" / "cert.pem"))
        return ctx

    def smtp(self, starttls: bool = True, login: tuple[str, str] | None = None) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.test", timeout=30)
        client.ehlo()
        if starttls:
            client.starttls(context=self.tls_context())
            client.ehlo()
        if login:
            client.login(*login)
        return client

    def smtps(self, login: tuple[str, str] | None = None) -> smtplib.SMTP_SSL:
        client = smtplib.SMTP_SSL("127.0.0.1", self.smtps_port, local_hostname="client.test",
                                  context=self.tls_context(), timeout=30)
        client.ehlo()
        if login:
            client.login(*login)
        return client

    # ---- the spool ----
    def spool_files(self, state: str = "queue") -> list[Path]:
        d = self.data / "spool" / state
        return sorted(d.iterdir()) if d.exists() else []


def message(sender: str, to: str, subject: str = "test", body: str = "hello\r\n") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.time_ns()}@client.test>\r\n\r\n{body}"
    ).encode()


class Peer:
    """A helper server of the tests (tests/smtp_sink.py, tests/dns_server.py) as its own
    process on 127.0.0.1, stopped by its PID."""

    def __init__(self, directory: Path, script: str, *args: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        port_file = self.dir / f"{script}.port"
        port_file.unlink(missing_ok=True)
        with open(self.dir / f"{script}.err", "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / script), "--port-file", str(port_file),
                 *args], env=env(), stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: port_file.exists() or self.process.poll() is not None,
                 what=f"{script} to listen")
        if self.process.poll() is not None:
            raise RuntimeError(f"{script} exited: {(self.dir / f'{script}.err').read_text()}")
        self.port = int(port_file.read_text())

    def stop(self) -> None:
        stop_process(self.process)


class Sink(Peer):
    """A recording SMTP server; ``rules`` sets per-recipient replies (re-read on change)."""

    def __init__(self, directory: Path, *args: str) -> None:
        directory = Path(directory)
        self.records = directory / "received"
        self.records.mkdir(parents=True, exist_ok=True)
        self.rules_path = directory / "rules.json"
        self.rules({})
        super().__init__(directory, "smtp_sink.py", "--record-dir", str(self.records),
                         "--rules", str(self.rules_path), *args)

    def rules(self, rules: dict) -> None:
        tmp = self.rules_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.rules_path)

    def messages(self) -> list[tuple[dict, bytes]]:
        """(envelope, bytes) of every message received, in arrival order."""
        out = []
        metas = sorted(self.records.glob("*.json"), key=lambda p: int(p.stem))
        for meta in metas:
            out.append((json.loads(meta.read_text()), meta.with_suffix(".eml").read_bytes()))
        return out

    def wait(self, count: int, timeout: float = 60.0) -> list[tuple[dict, bytes]]:
        return wait_for(lambda: (m := self.messages()) and len(m) >= count and m,
                        timeout=timeout, what=f"{count} messages at the sink")


class DNS(Peer):
    """An authoritative DNS server for test domains: records like "x.test MX 10 mx.x.test"."""

    def __init__(self, directory: Path, records: list[str], secure: list[str] = ()) -> None:
        args = [a for r in records for a in ("--record", r)]
        args += [a for zone in secure for a in ("--secure", zone)]
        super().__init__(directory, "dns_server.py", *args)
