"""A real OpenLDAP ``slapd`` for tests, on loopback with a throw-away database.

It builds a cn=config directory with ``slapadd``, starts ``/usr/sbin/slapd`` on an
ephemeral 127.0.0.1 port, then loads the shipped files the way the README tells an admin
to: ``etc/ldap/mailrelay-schema.ldif`` with ``ldapadd`` into cn=config and
``etc/ldap/example.ldif`` with ``ldapadd`` as the database's root DN.

Usage, from pytest, trial or a script::

    server = start_slapd(tmp_dir)          # started and answering
    server.settings()                       # uris, base_dn, bind_dn, bind_password, ca_file
    server.config_text(cache_ttl="1s")      # the same as an [ldap] section for mailrelay.ini
    server.stop(); server.start()           # LDAP down, then back on the same port
    server.pause(); server.resume()         # LDAP accepting connections but not answering
    server.close()                          # stops it; the caller removes tmp_dir

Or by hand: ``python tests/ldap_server.py DIR`` prints its [ldap] section and runs until
interrupted.

Only the slapd this object started is ever signalled, by its PID.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ldap3
from harness import free_port, stop_process

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAPADD = "ldapadd"
MODULE_PATH = "/usr/lib/ldap"
SYSTEM_SCHEMA = "/etc/ldap/schema"
SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "ldap"
SCHEMA_LDIF = SHIPPED / "mailrelay-schema.ldif"
EXAMPLE_LDIF = SHIPPED / "example.ldif"

BASE_DN = "dc=example,dc=test"
ROOT_DN = "cn=admin," + BASE_DN
ROOT_PASSWORD = "admin-secret"
CONFIG_DN = "cn=config"
CONFIG_PASSWORD = "config-secret"
# The service entry and the users of etc/ldap/example.ldif, with their example passwords.
SERVICE_DN = "cn=mailrelay,ou=services," + BASE_DN
SERVICE_PASSWORD = "service-secret"
USERS_DN = "ou=smtp-users," + BASE_DN
EXAMPLE_PASSWORDS = {
    "doe.test": "doe-domain-secret",
    "john@doe.test": "john-secret",
    "webmail": "webmail-secret",
    "newsletter": "newsletter-secret",
}

_WAIT_STEPS = 200  # x 0.05 s: how long start() waits for slapd to answer
_PORT_ATTEMPTS = 5  # another process may grab the port between picking and binding it


class SlapdError(RuntimeError):
    pass


def _config_ldif(directory: Path, tls: TlsFiles | None) -> str:
    tls_lines = ""
    if tls is not None:
        tls_lines = (
            f"olcTLSCACertificateFile: {tls.ca}\n"
            f"olcTLSCertificateFile: {tls.cert}\n"
            f"olcTLSCertificateKeyFile: {tls.key}\n"
        )
    # The service entry may read userPassword so that password_mode=compare can be tested
    # (users' passwords are otherwise only usable to bind), and may page through more
    # entries than the default size limit (500) to list users.
    return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {directory / "slapd.pid"}
{tls_lines}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_PATH}
olcModuleLoad: back_mdb
olcModuleLoad: argon2

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file://{SYSTEM_SCHEMA}/core.ldif
include: file://{SYSTEM_SCHEMA}/cosine.ldif
include: file://{SYSTEM_SCHEMA}/inetorgperson.ldif

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcRootDN: {CONFIG_DN}
olcRootPW: {CONFIG_PASSWORD}

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {directory}/db
olcSuffix: {BASE_DN}
olcRootDN: {ROOT_DN}
olcRootPW: {ROOT_PASSWORD}
olcAccess: {{0}}to attrs=userPassword by dn.exact="{SERVICE_DN}" read by anonymous auth by * none
olcAccess: {{1}}to * by users read by * none
olcLimits: dn.exact="{SERVICE_DN}" size.prtotal=unlimited
"""


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def write_tls_files(directory: Path) -> TlsFiles:
    """A fresh CA and a server certificate it signed for 127.0.0.1 only (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, public_key, signing_key, *extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build(
        "mailrelay test CA",
        "mailrelay test CA",
        ca_key.public_key(),
        ca_key,
        (x509.BasicConstraints(ca=True, path_length=None), True),
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = build(
        "127.0.0.1",
        "mailrelay test CA",
        key.public_key(),
        ca_key,
        (x509.SubjectAlternativeName(names), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
    )
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


class Slapd:
    """One slapd process serving BASE_DN from ``directory`` (which must exist)."""

    def __init__(self, directory: str | os.PathLike, *, tls: bool = False) -> None:
        self.directory = Path(directory)
        self.tls = write_tls_files(self.directory / "tls") if tls else None
        self.port = 0
        self.ldaps_port = 0
        self._process: subprocess.Popen | None = None
        self._loaded = False

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        """ldaps:// for the same server (only when made with tls=True). The certificate
        names 127.0.0.1 only, so ldaps://localhost:PORT must fail its host name check."""
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def settings(self) -> dict:
        """What a directory needs to reach this server as mailrelay's service entry."""
        return {
            "uris": [self.uri],
            "base_dn": BASE_DN,
            "bind_dn": SERVICE_DN,
            "bind_password": SERVICE_PASSWORD,
            "ca_file": str(self.tls.ca) if self.tls else None,
        }

    def config_text(self, **extra: str) -> str:
        """An ``[ldap]`` section of mailrelay.ini for this server (plus ``extra`` keys)."""
        settings = self.settings()
        lines = [
            "[ldap]",
            f"uris = {' '.join(settings['uris'])}",
            f"base_dn = {settings['base_dn']}",
            f"bind_dn = {settings['bind_dn']}",
            f"bind_password = {settings['bind_password']}",
        ]
        if settings["ca_file"]:
            lines.append(f"ca_file = {settings['ca_file']}")
        lines += [f"{key} = {value}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start slapd and wait until it answers; the first start also loads the data.

        A restart keeps the port, the database and anything changed in it.
        """
        if self.running:
            return
        if self.port:
            self._spawn()
            self._wait()
        else:
            atexit.register(self.stop)
            self._first_start()

    def _first_start(self) -> None:
        (self.directory / "db").mkdir(exist_ok=True)
        config = self.directory / "slapd.d"
        config.mkdir(exist_ok=True)
        ldif = self.directory / "config.ldif"
        ldif.write_text(_config_ldif(self.directory, self.tls))
        _run([SLAPADD, "-n0", "-F", str(config), "-l", str(ldif)])
        for _attempt in range(_PORT_ATTEMPTS):
            self.port = free_port()
            self.ldaps_port = free_port() if self.tls else 0
            self._spawn()
            try:
                self._wait()
                break
            except SlapdError:
                if self.running:
                    raise
        else:
            raise SlapdError(f"slapd did not start; see {self._log}")
        self._ldapadd(CONFIG_DN, CONFIG_PASSWORD, SCHEMA_LDIF)
        self._ldapadd(ROOT_DN, ROOT_PASSWORD, EXAMPLE_LDIF)

    def _ldapadd(self, bind_dn: str, password: str, ldif: Path) -> None:
        _run([LDAPADD, "-x", "-H", self.uri, "-D", bind_dn, "-w", password, "-f", str(ldif)])

    @property
    def _pid_file(self) -> Path:
        return self.directory / "slapd.pid"

    @property
    def _log(self) -> Path:
        return self.directory / "slapd.log"

    def _spawn(self) -> None:
        urls = self.uri + "/"
        if self.tls:
            urls += f" {self.ldaps_uri}/"
        with open(self._log, "ab") as log:
            # -d keeps slapd in the foreground, so the PID we hold is slapd's own.
            self._process = subprocess.Popen(
                [SLAPD, "-d", "0", "-F", str(self.directory / "slapd.d"), "-h", urls],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _wait(self) -> None:
        """Until an anonymous read of the root DSE works (or slapd exits)."""
        for _step in range(_WAIT_STEPS):
            if not self.running:
                raise SlapdError(f"slapd exited with {self._process.returncode}; see {self._log}")
            if self._answers():
                return
            time.sleep(0.05)
        raise SlapdError(f"slapd on {self.uri} did not answer; see {self._log}")

    def _answers(self) -> bool:
        # Our slapd writes its PID file once it listens: until then, whatever answers on
        # the port (another test's server that took it) is not ours.
        try:
            if self._pid_file.read_text().strip() != str(self._process.pid):
                return False
        except OSError:
            return False
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        conn = ldap3.Connection(
            ldap3.Server(self.uri, connect_timeout=1, get_info=ldap3.NONE), receive_timeout=1
        )
        try:
            return conn.bind() and conn.search("", "(objectClass=*)", ldap3.BASE)
        except ldap3.core.exceptions.LDAPException:
            return False
        finally:
            conn.unbind()

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL if it lingers); the data stays for start()."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a paused slapd cannot act on SIGTERM
        stop_process(process, timeout=10)

    close = stop

    def pause(self) -> None:
        """Freeze slapd: the kernel still accepts connections, nothing answers them.

        Returns once every thread is stopped: a busy machine can let one of them run on
        for a while after the signal.
        """
        os.kill(self._process.pid, signal.SIGSTOP)
        tasks = Path(f"/proc/{self._process.pid}/task")
        for _step in range(_WAIT_STEPS):
            if all(_thread_state(task) in ("T", "t") for task in tasks.iterdir()):
                return
            time.sleep(0.01)
        raise SlapdError(f"slapd {self._process.pid} did not stop")

    def resume(self) -> None:
        os.kill(self._process.pid, signal.SIGCONT)

    def admin(self) -> ldap3.Connection:
        """A connection bound as the root DN, to change entries behind a directory's back."""
        return ldap3.Connection(
            ldap3.Server(self.uri, get_info=ldap3.NONE),
            ROOT_DN,
            ROOT_PASSWORD,
            auto_bind=True,
            raise_exceptions=True,
        )

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_slapd(directory: str | os.PathLike, *, tls: bool = False) -> Slapd:
    """A started slapd serving etc/ldap/example.ldif from ``directory``.

    ``.settings()`` gives uris, base_dn, bind_dn, bind_password (the example service entry)
    and ca_file; ``.stop()`` ends it.
    """
    server = Slapd(directory, tls=tls)
    server.start()
    return server


def _thread_state(task: Path) -> str:
    """The state letter of /proc/PID/task/TID/stat (after the parenthesized name)."""
    try:
        return (task / "stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "T"  # the thread is gone


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise SlapdError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    with Slapd(sys.argv[1]) as running:
        print(running.config_text(), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            running._process.wait()
