"""A private Postfix instance for the bench: its own config, queue and data directories
under a temporary directory, loopback-only listeners on ports chosen at run time, relaying
everything to a sink on loopback. The system instance is never touched: every command
names this instance's config directory (``postfix -c DIR``).

Listeners, configured as the issue asks for the comparison with mailrelay:
- ``plain``: STARTTLS offered; mynetworks (IP authentication) or AUTH after STARTTLS;
- ``implicit``: TLS from the first byte (wrapper mode), AUTH;
both with Cyrus SASL (sasldb2, PLAIN and LOGIN), smtpd_sender_login_maps and
reject_sender_login_mismatch, and the bench's certificate.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time

from bench import procs

POSTFIX = "/usr/sbin/postfix"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"
REALM = "bench.test"

MASTER_CF = """\
{plain} inet n - n - {maxproc} smtpd
  -o syslog_name=postfix-bench/plain
{implicit} inet n - n - {maxproc} smtpd
  -o syslog_name=postfix-bench/implicit
  -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_security_level=encrypt
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def available() -> bool:
    return all(os.access(p, os.X_OK) for p in (POSTFIX, SASLPASSWD2)) and procs.has_user("postfix")


class PostfixInstance:
    """One private Postfix under ``base``; ``start()``/``stop()`` use ``postfix -c``."""

    name = "Postfix"
    ip_auth = True
    delivers = True

    def __init__(self, base: str, cert: str, key: str, sink_port: int,
                 mynetworks: str = "127.0.0.0/8", max_sessions: int = 100) -> None:
        self.base = os.path.abspath(base)
        self.config_dir = os.path.join(self.base, "etc")
        self.queue_dir = os.path.join(self.base, "queue")
        self.data_dir = os.path.join(self.base, "data")
        # Debian's Postfix reads the Cyrus config from $config_directory/sasl/smtpd.conf
        self.sasl_dir = os.path.join(self.config_dir, "sasl")
        self.log_file = os.path.join(self.base, "maillog")
        self.cert, self.key = cert, key
        self.sink_port = sink_port
        self.mynetworks = mynetworks
        self.max_sessions = max_sessions
        self.plain_port = procs.free_port()
        self.implicit_port = procs.free_port()
        self.users: dict[str, str] = {}  # login -> password
        self.running = False
        self.milter = None  # an OpenDKIMInstance, started with Postfix while signing
        self.signing = False

    # ---- configuration ----

    def configure(self, settings: dict[str, str] | None = None) -> None:
        """Write main.cf, master.cf, the SASL config and the directories."""
        uid = pwd.getpwnam("postfix").pw_uid
        gid = grp.getgrnam("postfix").gr_gid
        for d in (self.base, self.config_dir, self.sasl_dir):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        for d in (self.queue_dir, self.data_dir):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.queue_dir, 0o755)
        os.chown(self.data_dir, uid, gid)
        sasldb = os.path.join(self.sasl_dir, "sasldb2")
        with open(os.path.join(self.sasl_dir, "smtpd.conf"), "w") as f:
            f.write(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                    f"mech_list: PLAIN LOGIN\nsasldb_path: {sasldb}\n")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": "postfix-bench",
            "maillog_file": self.log_file,
            "maillog_file_prefixes": self.base,
            "myhostname": "postfix-bench.localdomain",
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "inet_interfaces": procs.HOST,
            "inet_protocols": "ipv4",
            "mynetworks": self.mynetworks,
            "relayhost": f"[{procs.HOST}]:{self.sink_port}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_chain_files": f"{self.key}, {self.cert}",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_auth_only": "yes",
            "smtpd_tls_session_cache_database": "btree:${data_directory}/smtpd_scache",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": self.sasl_dir,
            "smtpd_sasl_local_domain": REALM,
            "smtpd_sender_login_maps": f"texthash:{self.config_dir}/sender_logins",
            "smtpd_sender_restrictions": "reject_sender_login_mismatch",
            "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, reject",
            "smtpd_recipient_restrictions": "",
            "message_size_limit": str(60 * 10**6),
            # The bench measures throughput from one client address: no per-client caps.
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_auth_rate_limit": "0",
            "smtpd_client_new_tls_session_rate_limit": "0",
        }
        main.update(settings or {})
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in main.items())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(plain=f"{procs.HOST}:{self.plain_port}",
                                     implicit=f"{procs.HOST}:{self.implicit_port}",
                                     maxproc=self.max_sessions))
        self._write_logins()

    def postconf(self, **settings: str) -> None:
        """Change main.cf settings (takes effect at the next start or reload)."""
        args = [f"{k}={v}" for k, v in settings.items()]
        subprocess.run(["postconf", "-c", self.config_dir, "-e", *args], check=True)

    def sign(self, on: bool) -> None:
        """DKIM signing by the milter on or off, from the next start. A message the milter
        cannot take is deferred (``tempfail``), never passed on unsigned."""
        if on and self.milter is None:
            raise RuntimeError("no OpenDKIM milter for this Postfix")
        spec = self.milter.milter if on else ""
        self.postconf(smtpd_milters=spec, non_smtpd_milters=spec,
                      milter_default_action="tempfail")
        self.signing = on

    @property
    def dkim_record(self) -> str | None:
        return self.milter.record() if self.signing else None

    def add_users(self, users: dict[str, str]) -> None:
        """Create SASL logins (login -> password); each may send as login@bench.test."""
        sasldb = os.path.join(self.sasl_dir, "sasldb2")
        for login, password in users.items():
            subprocess.run([SASLPASSWD2, "-f", sasldb, "-c", "-p", "-u", REALM, login],
                           input=password.encode(), check=True)
        os.chown(sasldb, 0, grp.getgrnam("postfix").gr_gid)
        os.chmod(sasldb, 0o640)
        self.users.update(users)
        self._write_logins()

    def _write_logins(self) -> None:
        with open(os.path.join(self.config_dir, "sender_logins"), "w") as f:
            # Cyrus appends the realm: the SASL login name Postfix sees is login@realm.
            f.writelines(f"{login}@{REALM} {login}@{REALM}\n" for login in sorted(self.users))

    # ---- running ----

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", self.config_dir, *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self, timeout: float = 30) -> float:
        """Start and wait for the 220 on the plain port; returns seconds it took."""
        t0 = time.monotonic()
        if self.signing:
            self.milter.start()
        done = self._postfix("start", timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stdout}{done.stderr}"
                               f"{self.log_tail()}")
        self.running = True
        procs.wait_banner(self.plain_port, timeout)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.running:
            self._postfix("stop")
            self.running = False
            master = self.master_pid()
            deadline = time.monotonic() + 20
            while master and procs.alive(master) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.milter is not None:  # also when Postfix failed to start after it
            self.milter.stop()

    def reload(self) -> None:
        done = self._postfix("reload")
        if done.returncode != 0:
            raise RuntimeError(f"postfix reload failed: {done.stdout}{done.stderr}")

    def pause_delivery(self) -> None:
        """Accept and queue only: messages wait in the deferred queue."""
        self.postconf(defer_transports="smtp")
        self.reload()

    def resume_delivery(self, timeout: float = 60) -> float:
        """Restart with delivery on and flush the queue; returns the startup seconds
        (``postfix start`` until the listener's 220)."""
        self.stop()
        self.postconf(defer_transports="")
        startup = self.start(timeout)
        self.flush()
        return startup

    def deferred(self) -> int:
        n = 0
        for _, _, files in os.walk(os.path.join(self.queue_dir, "deferred")):
            n += len(files)
        return n

    def flush(self) -> None:
        """Ask for delivery of every deferred message now (postqueue -f)."""
        subprocess.run(["postqueue", "-c", self.config_dir, "-f"], check=True, timeout=60)

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    @property
    def pid(self) -> int | None:
        return self.master_pid() if self.running else None

    def signing_cpu(self) -> float:
        """CPU seconds of all of Postfix's processes and of the milter: Postfix's own work
        for signing is its cleanup talking to the milter."""
        pid = self.master_pid()
        return (procs.tree_cpu(pid) if pid else 0.0) + (self.milter.cpu() if self.milter
                                                         else 0.0)

    def memory(self) -> int:
        """Summed PSS of the master and all its children (smtpd, cleanup, qmgr, ...)."""
        pid = self.master_pid()
        return procs.tree_memory(pid) if pid else 0

    def queued(self) -> int:
        """Messages in the instance's queues (files under incoming/active/deferred/hold)."""
        n = 0
        for q in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _, _, files in os.walk(os.path.join(self.queue_dir, q)):
                n += len(files)
        return n

    def log_tail(self, lines: int = 20) -> str:
        return procs.tail(self.log_file, lines)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
