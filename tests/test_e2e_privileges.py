"""End to end: twistd started by root the way etc/systemd/mailrelay.service starts it binds
ports 25, 465 and 587, gives data_dir to its --uid/--gid user and serves as that user, its
delivery process too; mailrelay-admin run as that user reaches it. Started as that user
with CAP_NET_BIND_SERVICE (the no-root drop-in), it serves the same ports."""

from __future__ import annotations

import grp
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, env, stop_process, twistd, wait_for

UNIT = ROOT / "etc" / "systemd" / "mailrelay.service"
NO_ROOT = ROOT / "etc" / "systemd" / "mailrelay.service.d" / "no-root.conf"
PASSWORD = "correct horse battery"
USER, GROUP = "nobody", "nogroup"  # stand-ins for the mailrelay user sysusers.d makes
PORTS = (25, 465, 587)
RUN_TWISTD = "from twisted.scripts.twistd import run; run()"  # what the twistd script runs


def unit_setting(name: str, unit: Path = UNIT) -> str:
    """The setting's last value (an empty one resets a list, as in a drop-in)."""
    lines = [line for line in unit.read_text().splitlines() if line.startswith(f"{name}=")]
    assert lines, name
    return lines[-1].removeprefix(f"{name}=")


def exec_start() -> list[str]:
    """The unit's ExecStart as an argument list."""
    return shlex.split(unit_setting("ExecStart"))


def as_the_unit_confines() -> list[str]:
    """setpriv applying the unit's NoNewPrivileges and CapabilityBoundingSet: the relay
    must start and switch user with those alone."""
    assert unit_setting("NoNewPrivileges") == "yes"
    caps = [c.lower().removeprefix("cap_") for c in unit_setting("CapabilityBoundingSet").split()]
    return ["setpriv", "--nnp", "--bounding-set", ",".join(["-all", *(f"+{c}" for c in caps)])]


def free_loopback_address() -> str:
    """A 127.0.0.x on which 25, 465 and 587 are free (another program on the machine may
    hold them on 127.0.0.1)."""
    for last in random.sample(range(2, 255), 40):
        host = f"127.0.0.{last}"
        sockets = []
        try:
            for port in PORTS:
                s = socket.socket()
                sockets.append(s)
                s.bind((host, port))
            return host
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError("no 127.0.0.x with ports 25, 465 and 587 free")


def user_env() -> dict[str, str]:
    """The harness's environment, with this interpreter's packages on the path, for an
    interpreter other than this one (see python_for)."""
    e = env()
    packages = [p for p in sys.path if p.endswith("-packages")]
    e["PYTHONPATH"] = os.pathsep.join([e["PYTHONPATH"], *packages])
    return e


def python_for(uid: int, gid: int, cwd: str) -> str:
    """An interpreter the user can run: this one, or else the system's of the same
    version (this one may live under a directory only root can enter, as pyenv's does
    under /root)."""
    version = "{}.{}".format(*sys.version_info[:2])
    probe = ("import sys, twisted.scripts.twistd, mailrelay.service; "
             f"assert sys.version_info[:2] == {tuple(sys.version_info[:2])!r}")
    for python in (sys.executable, f"/usr/bin/python{version}"):
        if not os.path.exists(python):
            continue
        try:
            result = subprocess.run([python, "-c", probe], user=uid, group=gid,
                                    extra_groups=[], env=user_env(), cwd=cwd,
                                    capture_output=True, timeout=60)
        except PermissionError:
            continue
        if result.returncode == 0:
            return python
    raise AssertionError(f"no Python {version} with mailrelay's packages that uid {uid} can run")


def ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/PID/status, and its effective capabilities."""
    status = Path(f"/proc/{pid}/status").read_text()
    out = {key: [int(v) for v in re.search(rf"^{key}:[ \t]*(.*)$", status, re.M).group(1).split()]
           for key in ("Uid", "Gid", "Groups", "PPid", "NoNewPrivs")}
    out["CapEff"] = [int(re.search(r"^CapEff:\s*(\w+)$", status, re.M).group(1), 16)]
    return out


class Machine:
    """What systemd-sysusers and systemd-tmpfiles would have made, in a directory of its
    own (/tmp/pytest-of-root is root's only), with listeners on 25, 465 and 587."""

    def __init__(self) -> None:
        self.uid, self.gid = pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid
        self.python = python_for(self.uid, self.gid, "/")
        self.base = tempfile.mkdtemp(prefix="mailrelay-root-")
        os.chmod(self.base, 0o755)
        self.data = Path(self.base) / "data"
        self.host = free_loopback_address()
        self.config = Path(self.base) / "mailrelay.ini"
        self.config.write_text(
            f"[server]\nhostname = relay.test\ndata_dir = {self.data}\n[admin]\nenabled = no\n"
            f"[listener:smtp]\nendpoint = tcp:25:interface={self.host}\ntls = starttls\n"
            f"[listener:submissions]\nendpoint = tcp:465:interface={self.host}\ntls = implicit\n"
            f"[listener:submission]\nendpoint = tcp:587:interface={self.host}\ntls = starttls\n")
        self.log_path = Path(self.base) / "stdout"

    def admin(self, *args: str, stdin: str | None = None, as_user: bool = False):
        user = dict(user=self.uid, group=self.gid, extra_groups=[]) if as_user else {}
        return subprocess.run([self.python, "-m", "mailrelay.admin.cli", "-c", str(self.config),
                               *args], input=stdin, env=user_env(), cwd=self.base,
                              capture_output=True, text=True, timeout=60, **user)

    def add_user(self, as_user: bool) -> None:
        for args, stdin in ((["account", "set", "default", "--domains", "doe.test"], None),
                            (["user", "add", "doe.test", "--password-stdin", "--status",
                              "sandboxed"], PASSWORD + "\n")):
            done = self.admin(*args, stdin=stdin, as_user=as_user)
            assert done.returncode == 0, done.stderr

    def twistd(self, argv: list[str]) -> list[str]:
        """The command line for the unit's ``argv``: its twistd, or this interpreter
        running what the twistd script runs."""
        if self.python == sys.executable:
            return [twistd(), *argv]
        return [self.python, "-c", RUN_TWISTD, *argv]

    def start(self, command: list[str]) -> subprocess.Popen:
        with open(self.log_path, "ab") as out:
            process = subprocess.Popen(command, env=user_env(), cwd=self.base, stdout=out,
                                       stderr=subprocess.STDOUT,
                                       umask=int(unit_setting("UMask"), 8))

        def listening() -> bool:
            assert process.poll() is None, self.log_path.read_text()
            try:
                socket.create_connection((self.host, 587), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, what=f"mailrelay on {self.host}:587")
        return process

    def delivery_pid(self, count: int = 1) -> int:
        found = wait_for(lambda: (pids := re.findall(r"delivery process (\d+) started",
                                                     self.log_path.read_text()))
                         and len(pids) >= count and pids, what="the delivery process")
        return int(found[-1])

    def submit(self) -> None:
        """A message through 587 (STARTTLS, AUTH), and a greeting on 465 and 25."""
        with smtplib.SMTP(self.host, 587, local_hostname="client.test", timeout=30) as client:
            client.starttls(context=self.tls())
            client.login("doe.test", PASSWORD)
            client.sendmail("a@doe.test", ["bob@example.net"],
                            b"From: <a@doe.test>\r\nSubject: hi\r\n\r\nhi\r\n")
        with smtplib.SMTP_SSL(self.host, 465, context=self.tls(), timeout=30) as client:
            assert client.ehlo()[0] == 250
        with smtplib.SMTP(self.host, 25, timeout=30) as client:
            assert client.ehlo()[0] == 250

    def tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.data / "tls" / "cert.pem"))
        context.check_hostname = False  # the self-signed certificate names 127.0.0.1, not .x
        return context

    def not_the_users(self) -> list[str]:
        return [str(p) for p in [self.data, *self.data.rglob("*")]
                if (p.lstat().st_uid, p.lstat().st_gid) != (self.uid, self.gid)]

    def remove(self) -> str:
        text = self.log_path.read_text()
        shutil.rmtree(self.base, ignore_errors=True)
        return text


def assert_runs_as(seen: dict, machine: Machine, caps: int) -> None:
    assert seen["Uid"] == [machine.uid] * 4 and seen["Gid"] == [machine.gid] * 4, seen
    assert set(seen["Groups"]) <= {machine.gid} and seen["CapEff"] == [caps], seen
    assert seen["NoNewPrivs"] == [1], seen  # confined as the unit confines it


def test_started_as_root_it_serves_privileged_ports_as_its_user():
    assert os.geteuid() == 0, "this test starts twistd as root, as systemd does"
    machine = Machine()
    machine.add_user(as_user=False)  # as root: files the start gives to the user
    argv = exec_start()
    assert argv[1:] == ["--nodaemon", "--pidfile=", "--uid", "mailrelay", "--gid", "mailrelay",
                        "mailrelay", "--config", "/etc/mailrelay/mailrelay.ini"]
    command = as_the_unit_confines() + machine.twistd(
        argv[1:3] + ["--uid", USER, "--gid", GROUP, "mailrelay", "--config", str(machine.config)])
    process = machine.start(command)
    try:
        delivery = machine.delivery_pid()
        assert_runs_as(ids(process.pid), machine, 0)
        assert_runs_as(ids(delivery), machine, 0)
        assert ids(delivery)["PPid"] == [process.pid]
        machine.submit()
        assert len(list((machine.data / "spool" / "hold").iterdir())) == 1

        # The control socket is the user's: mailrelay-admin run as that user reaches it.
        flush = machine.admin("queue", "flush", as_user=True)
        assert (flush.returncode, flush.stdout) == (0, "0 deferred messages due now\n"), flush
        assert machine.not_the_users() == []
        # twistd ends with the signal that stopped it; systemd counts SIGTERM as a clean stop
        assert stop_process(process) == -signal.SIGTERM

        # Started again, as root it reads the files it gave away (mode 0600 some of them).
        process = machine.start(command)
        with smtplib.SMTP(machine.host, 587, local_hostname="client.test", timeout=30) as c:
            c.starttls(context=machine.tls())
            c.login("doe.test", PASSWORD)
        assert stop_process(process) == -signal.SIGTERM
    finally:
        stop_process(process)
        text = machine.remove()
    assert text.count(f"set uid/gid {machine.uid}/{machine.gid}") == 2
    assert "Traceback" not in text and "Permission denied" not in text


def test_never_root_with_the_capability_to_bind_low_ports():
    """The no-root drop-in: the user from the start, CAP_NET_BIND_SERVICE ambient."""
    assert os.geteuid() == 0, "this test starts the relay as systemd would, which needs root"
    machine = Machine()
    os.chown(machine.base, machine.uid, machine.gid)  # as tmpfiles.d makes data_dir's parent
    argv = shlex.split(unit_setting("ExecStart", NO_ROOT))
    assert argv[1:] == ["--nodaemon", "--pidfile=", "mailrelay", "--config",
                        "/etc/mailrelay/mailrelay.ini"]
    assert (unit_setting("User", NO_ROOT), unit_setting("Group", NO_ROOT)) == (
        "mailrelay", "mailrelay")
    [cap] = unit_setting("AmbientCapabilities", NO_ROOT).split()
    assert unit_setting("CapabilityBoundingSet", NO_ROOT) == cap
    cap = cap.lower().removeprefix("cap_")
    systemd = ["setpriv", "--reuid", str(machine.uid), "--regid", str(machine.gid),
               "--clear-groups", "--nnp", "--inh-caps", f"-all,+{cap}",
               "--ambient-caps", f"-all,+{cap}", "--bounding-set", f"-all,+{cap}"]
    machine.add_user(as_user=True)  # sudo -u mailrelay mailrelay-admin ...
    process = machine.start(systemd + machine.twistd(
        argv[1:4] + ["--config", str(machine.config)]))
    try:
        bind_service = 1 << 10  # CAP_NET_BIND_SERVICE's bit
        assert_runs_as(ids(process.pid), machine, bind_service)
        assert_runs_as(ids(machine.delivery_pid()), machine, bind_service)  # inherited
        machine.submit()
        assert machine.not_the_users() == []
    finally:
        stop_process(process)
        text = machine.remove()
    assert "Traceback" not in text and "Permission denied" not in text
