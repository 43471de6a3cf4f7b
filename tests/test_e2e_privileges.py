"""End to end: twistd started by root the way etc/systemd/mailrelay.service starts it binds
ports 25, 465 and 587, gives data_dir to its --uid/--gid user and serves as that user, its
delivery process too; mailrelay-admin run as that user reaches it."""

from __future__ import annotations

import os
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
PASSWORD = "correct horse battery"
USER, GROUP = "nobody", "nogroup"  # stand-ins for the mailrelay user sysusers.d makes
PORTS = (25, 465, 587)
RUN_TWISTD = "from twisted.scripts.twistd import run; run()"  # what the twistd script runs


def unit_setting(name: str) -> str:
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith(f"{name}=")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix(f"{name}=")


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
    out = {key: [int(v) for v in re.search(rf"^{key}:\s*(.*)$", status, re.M).group(1).split()]
           for key in ("Uid", "Gid", "Groups", "PPid", "NoNewPrivs")}
    out["CapEff"] = [int(re.search(r"^CapEff:\s*(\w+)$", status, re.M).group(1), 16)]
    return out


def test_started_as_root_it_serves_privileged_ports_as_its_user(tmp_path):
    assert os.geteuid() == 0, "this test starts twistd as root, as systemd does"
    import grp
    import pwd

    uid, gid = pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid
    base = tempfile.mkdtemp(prefix="mailrelay-root-")  # /tmp/pytest-of-root is root's only
    os.chmod(base, 0o755)
    data = Path(base) / "data"
    host = free_loopback_address()
    config = Path(base) / "mailrelay.ini"
    config.write_text(
        f"[server]\nhostname = relay.test\ndata_dir = {data}\n[admin]\nenabled = no\n"
        f"[listener:smtp]\nendpoint = tcp:25:interface={host}\ntls = starttls\n"
        f"[listener:submissions]\nendpoint = tcp:465:interface={host}\ntls = implicit\n"
        f"[listener:submission]\nendpoint = tcp:587:interface={host}\ntls = starttls\n")
    admin = [sys.executable, "-m", "mailrelay.admin.cli", "-c", str(config)]
    for args, stdin in (([*admin, "account", "set", "default", "--domains", "doe.test"], None),
                        ([*admin, "user", "add", "doe.test", "--password-stdin", "--status",
                          "sandboxed"], PASSWORD + "\n")):
        done = subprocess.run(args, input=stdin, env=env(), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr  # as root: files the start hands over

    argv = exec_start()
    assert argv[1:] == ["--nodaemon", "--pidfile=", "--uid", "mailrelay", "--gid", "mailrelay",
                        "mailrelay", "--config", "/etc/mailrelay/mailrelay.ini"]
    python = python_for(uid, gid, base)
    command = as_the_unit_confines()
    command += [twistd()] if python == sys.executable else [python, "-c", RUN_TWISTD]
    command += argv[1:3] + ["--uid", USER, "--gid", GROUP, "mailrelay", "--config", str(config)]
    log_path = Path(base) / "stdout"

    def start() -> subprocess.Popen:
        with open(log_path, "ab") as out:
            process = subprocess.Popen(command, env=user_env(), cwd=base, stdout=out,
                                       stderr=subprocess.STDOUT,
                                       umask=int(unit_setting("UMask"), 8))

        def listening() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                socket.create_connection((host, 587), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, what=f"mailrelay on {host}:587")
        return process

    process = start()
    try:
        found = wait_for(lambda: re.search(r"delivery process (\d+) started",
                                           log_path.read_text()), what="the delivery process")
        relay_ids, delivery_ids = ids(process.pid), ids(int(found.group(1)))
        for seen in (relay_ids, delivery_ids):
            assert seen["Uid"] == [uid] * 4 and seen["Gid"] == [gid] * 4, seen
            assert set(seen["Groups"]) <= {gid} and seen["CapEff"] == [0], seen
            assert seen["NoNewPrivs"] == [1], seen  # confined as the unit confines it
        assert delivery_ids["PPid"] == [process.pid]

        context = ssl.create_default_context(cafile=str(data / "tls" / "cert.pem"))
        context.check_hostname = False  # the self-signed certificate names 127.0.0.1, not .x
        with smtplib.SMTP(host, 587, local_hostname="client.test", timeout=30) as client:
            client.starttls(context=context)
            client.login("doe.test", PASSWORD)
            client.sendmail("a@doe.test", ["bob@example.net"],
                            b"From: <a@doe.test>\r\nSubject: hi\r\n\r\nhi\r\n")
        with smtplib.SMTP_SSL(host, 465, context=context, timeout=30) as client:
            assert client.ehlo()[0] == 250
        with smtplib.SMTP(host, 25, timeout=30) as client:
            assert client.ehlo()[0] == 250
        assert len(list((data / "spool" / "hold").iterdir())) == 1

        # The control socket is the user's: mailrelay-admin run as that user reaches it.
        flush = subprocess.run([python, "-m", "mailrelay.admin.cli", "-c", str(config),
                                "queue", "flush"], user=uid, group=gid, extra_groups=[],
                               env=user_env(), cwd=base, capture_output=True, text=True,
                               timeout=60)
        assert (flush.returncode, flush.stdout) == (0, "0 deferred messages due now\n"), flush

        wrong = [str(p) for p in [data, *data.rglob("*")]
                 if (p.lstat().st_uid, p.lstat().st_gid) != (uid, gid)]
        assert wrong == []
        # twistd ends with the signal that stopped it; systemd counts SIGTERM as a clean stop
        assert stop_process(process) == -signal.SIGTERM

        # Started again, as root it reads the files it gave away (mode 0600 some of them).
        process = start()
        with smtplib.SMTP(host, 587, local_hostname="client.test", timeout=30) as client:
            client.starttls(context=context)
            client.login("doe.test", PASSWORD)
        assert stop_process(process) == -signal.SIGTERM
    finally:
        stop_process(process)
        text = log_path.read_text()
        shutil.rmtree(base, ignore_errors=True)
    assert text.count(f"set uid/gid {uid}/{gid}") == 2
    assert "Traceback" not in text and "Permission denied" not in text
