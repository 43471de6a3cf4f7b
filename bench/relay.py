"""mailrelay for the bench: a config in a temporary directory, users, and the daemon run as
``twistd -n mailrelay --config FILE`` (stopped by its PID).

The bench config: a plain+STARTTLS listener and an implicit TLS listener on loopback ports
chosen at run time, the bench certificate, IP authentication of the client network mapped to
an SMTP user, a file directory, and delivery through a smarthost that is the bench sink.
Settings the running mailrelay does not know yet are dropped (and reported), so the bench
works against whatever has landed; the figures that need them print "n/a".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

from bench import procs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN = "bench.test"

_UNKNOWN = re.compile(r": \[([^\]]+)\](?: (\S+))?: unknown (setting|section)")


def available() -> tuple[bool, str]:
    """Whether mailrelay can be started here; the reason when not."""
    if not os.path.exists(os.path.join(REPO, "twisted", "plugins", "mailrelay_plugin.py")):
        return False, "no twistd plugin"
    try:
        import mailrelay.config  # noqa: F401
        import mailrelay.service  # noqa: F401
    except ImportError as e:
        return False, f"cannot import mailrelay: {e}"
    return True, ""


def env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": REPO + (os.pathsep + path if path else "")}


def render_ini(sections: dict[str, dict[str, str]]) -> str:
    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {v}" for k, v in keys.items())
        out.append("")
    return "\n".join(out)


class MailRelayInstance:
    """One mailrelay daemon under ``base``."""

    name = "mailrelay"

    def __init__(self, base: str, cert: str, key: str, sink_port: int,
                 ip_network: str = "127.0.0.0/8", ip_user: str = f"ip@{DOMAIN}",
                 profile_dir: str | None = None) -> None:
        self.base = os.path.abspath(base)
        self.data_dir = os.path.join(self.base, "data")
        self.config_path = os.path.join(self.base, "mailrelay.ini")
        self.users_file = os.path.join(self.data_dir, "users.json")
        self.spool_dir = os.path.join(self.data_dir, "spool")
        self.log_file = os.path.join(self.base, "twistd.log")
        self.cert, self.key = cert, key
        self.sink_port = sink_port
        self.ip_network, self.ip_user = ip_network, ip_user
        self.plain_port = procs.free_port()
        self.implicit_port = procs.free_port()
        self.metrics_port = procs.free_port()
        self.dropped: list[str] = []  # settings this mailrelay does not know yet
        self.proc: subprocess.Popen | None = None
        self.profile_dir = profile_dir  # twistd --profiler cprofile, one file per start
        self.starts = 0
        self.delivers = True  # False when it runs with [delivery] enabled = no
        self.dkim_record: str | None = None  # set while the bench domain has a key
        self.extra_sections: dict[str, dict[str, str]] = {}  # over sections() (cluster.py)

    # ---- configuration ----

    def sections(self, delivery: bool = True) -> dict[str, dict[str, str]]:
        host = procs.HOST
        sections = {
            "server": {"hostname": "mailrelay-bench.localdomain", "data_dir": self.data_dir},
            "tls": {"certificate": self.cert, "key": self.key},
            "listener:plain": {"endpoint": f"tcp:{self.plain_port}:interface={host}",
                               "tls": "starttls"},
            "listener:implicit": {"endpoint": f"tcp:{self.implicit_port}:interface={host}",
                                  "tls": "implicit"},
            "directory": {"backend": "file", "file": self.users_file},
            "spool": {"directory": self.spool_dir, "min_free_space": "1M"},
            "delivery": {"enabled": "yes" if delivery else "no", "mode": "smarthost",
                         "smarthost": f"{host}:{self.sink_port}", "smarthost_tls": "none",
                         "smarthost_verify": "no", "max_concurrency": "20",
                         "max_per_host": "20", "retry_first": "5s", "retry_max": "10s"},
            # The bench's load comes from one address and a few users at rates no real
            # client reaches: connection and rate limits off (0).
            "limits": {"max_message_size": "50M", "max_connections": "0",
                       "max_connections_per_ip": "0", "max_connections_per_user": "0",
                       "rate_per_hour": "0", "rate_per_minute": "0"},
            "policy": {"ip_auth": f"{self.ip_network} = {self.ip_user}"},
            "admin": {"enabled": "no"},  # no control panel: nothing to measure there
            # Counting on, as in production: metrics served on a listener of their own.
            "metrics": {"endpoint": f"tcp:{self.metrics_port}:interface={host}"},
        }
        for name, keys in self.extra_sections.items():
            sections.setdefault(name, {}).update(keys)
        return sections

    def configure(self, delivery: bool = True) -> None:
        """Write the config, dropping every setting the installed mailrelay rejects as
        unknown (recorded in ``self.dropped``)."""
        from mailrelay.config import ConfigError, load_config

        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        sections = self.sections(delivery)
        self.dropped = []
        for _ in range(100):  # bounded: each pass drops one setting
            with open(self.config_path, "w") as f:
                f.write(render_ini(sections))
            try:
                load_config(self.config_path)
                return
            except ConfigError as e:
                m = _UNKNOWN.search(str(e))
                if not m or m.group(1) not in sections:
                    raise
                section, key, what = m.groups()
                if what == "section" or key is None:
                    sections.pop(section)
                    self.dropped.append(f"[{section}]")
                else:
                    sections[section].pop(key, None)
                    self.dropped.append(f"[{section}] {key}")
        raise RuntimeError("mailrelay config: too many unknown settings")

    @property
    def ip_auth(self) -> bool:
        return not any(d.startswith("[policy]") and ("ip_auth" in d or d == "[policy]")
                       for d in self.dropped)

    def add_users(self, users: dict[str, str]) -> None:
        """Address-level users (login = address, may send only from it), login -> password.

        Users are written through the file directory's store with one password hash per
        distinct password: every login still verifies a full hash, and setting up 1,000
        users takes no hashing time."""
        from mailrelay.auth.passwords import hash_password
        from mailrelay.directory.filedir import UserStore
        from mailrelay.model import SmtpUser

        hashes: dict[str, str] = {}
        store = UserStore(self.users_file)
        with store.change() as s:
            default = s.account("default")
            if DOMAIN not in default.domains:
                s.update_account("default", domains=default.domains | {DOMAIN})
            for login, password in users.items():
                if password not in hashes:
                    hashes[password] = hash_password(password)
                s.add_user(SmtpUser(username=login), hashes[password])

    def admin(self, *args: str) -> str:
        """Run ``mailrelay-admin`` on this instance's config; returns its output."""
        done = subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c",
                               self.config_path, *args], capture_output=True, text=True,
                              env=env(), cwd=self.base, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"mailrelay-admin {' '.join(args)}: "
                               f"{(done.stdout + done.stderr).strip()[-300:]}")
        return done.stdout

    def dkim_add(self, selector: str = "bench") -> str:
        """Give the bench's domain an RSA-2048 key (active at once: every message from the
        domain is signed from the next start); returns its DNS record (``v=DKIM1; ...``)."""
        self.admin("dkim", "add", DOMAIN, "--selector", selector, "--bits", "2048")
        shown = json.loads(self.admin("dkim", "show", DOMAIN, "--json", "--no-dns"))
        (key,) = [k for k in shown if k["selector"] == selector and k["state"] == "active"]
        return key["dns_value"]

    def dkim_del(self, selector: str = "bench") -> None:
        self.admin("dkim", "del", DOMAIN, selector)

    def sign(self, on: bool) -> None:
        """DKIM signing of the bench domain's mail on or off, from the next start."""
        if on and self.dkim_record is None:
            self.dkim_record = self.dkim_add()
        elif not on and self.dkim_record is not None:
            self.dkim_del()
            self.dkim_record = None

    # ---- running ----

    def start(self, timeout: float = 60) -> float:
        """Start the daemon and wait for the 220 on the plain listener; returns seconds."""
        # twistd, run by this interpreter (the one that has mailrelay's dependencies)
        self.starts += 1
        profile = []
        if self.profile_dir:
            path = os.path.join(self.profile_dir, f"mailrelay-{self.starts}.prof")
            profile = ["--profile", path, "--profiler", "cprofile", "--savestats"]
        cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
               "-n", "--logfile", self.log_file, "--pidfile", "", *profile,
               "mailrelay", "--config", self.config_path]
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=env(), cwd=self.base,
                                         preexec_fn=procs.die_with_this_process())
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                last = tail.strip().splitlines()[-1] if tail.strip() else ""
                raise RuntimeError(f"mailrelay exited ({self.proc.returncode}): {last}\n{tail}")
            try:
                procs.wait_banner(self.plain_port, min(0.5, deadline - time.monotonic()))
                return time.monotonic() - t0
            except TimeoutError:
                continue
        self.stop()
        raise RuntimeError(f"mailrelay gave no 220 within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> None:
        if self.proc is not None:
            procs.terminate(self.proc, timeout)
        self.proc = None

    def start_degraded(self, timeout: float = 60) -> float:
        """Start with delivery off (for a mailrelay whose delivery cannot start yet): the
        figures that need no delivery can still be measured."""
        self.configure(delivery=False)
        startup = self.start(timeout)
        self.delivers = False
        return startup

    def pause_delivery(self) -> None:
        """Restart with delivery off: messages stay queued."""
        self.stop()
        self.configure(delivery=False)
        self.start()

    def resume_delivery(self, timeout: float = 60) -> float:
        """Restart with delivery on; returns the startup seconds (spawn until the 220)."""
        self.stop()
        self.configure(delivery=True)
        self.delivers = True
        return self.start(timeout)

    def deferred(self) -> int:
        return self.queued()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def delivery_pid(self) -> int | None:
        """The delivery process (the relay's one child)."""
        kids = procs.children(self.pid) if self.pid else []
        return kids[0] if len(kids) == 1 else None

    def signing_cpu(self) -> float:
        """CPU seconds of the process that signs: the delivery process (0 if none)."""
        pid = self.delivery_pid()
        return procs.tree_cpu(pid) if pid else 0.0

    def memory(self) -> int:
        """RSS of the daemon (summed PSS if it runs helper processes)."""
        return procs.tree_memory(self.pid) if self.pid else 0

    def queued(self) -> int:
        n = 0
        for sub in ("queue", "tmp"):
            try:
                n += len(os.listdir(os.path.join(self.spool_dir, sub)))
            except FileNotFoundError:
                pass
        return n

    def log_tail(self, lines: int = 30) -> str:
        return procs.tail(self.log_file, lines)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
