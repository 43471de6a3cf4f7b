"""Debian's HAProxy in TCP mode in front of relays, for the tests: each front port
forwards to one or more relay ports (round robin), with a PROXY option such as
``send-proxy-v2``. Started and stopped by PID; its log beside its configuration. With
``admin = True`` it has a runtime API socket (``runtime("disable server ...")``), as an
operator uses to take a node out or put one in."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from harness import free_port, stop_process, wait_for

HAPROXY = "/usr/sbin/haproxy"
NOT_INSTALLED = "Debian's haproxy is not installed (./test.sh installs it)"


def installed() -> bool:
    return bool(shutil.which("haproxy")) or os.path.exists(HAPROXY)


def config(fronts: dict[int, tuple[list[int], str]], admin_socket: str = "",
           disabled: frozenset[int] = frozenset()) -> str:  # fmt: skip
    """``fronts``: front port -> (relay ports, server options); ``disabled``: relay ports
    whose server starts disabled (to be enabled through ``admin_socket``)."""
    text = f"global\n    stats socket {admin_socket} level admin\n" if admin_socket else ""
    text += ("defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
            "    timeout server 60s\n")
    for front, (ports, option) in fronts.items():
        text += (f"frontend f{front}\n    bind 127.0.0.1:{front}\n    default_backend b{front}\n"
                 f"backend b{front}\n    balance roundrobin\n")
        text += "".join(f"    server relay{i} 127.0.0.1:{port} {option}"
                        + (" disabled\n" if port in disabled else "\n")
                        for i, port in enumerate(ports))
    return text


class Balancer:
    def __init__(self, directory: Path, fronts: dict[int, tuple[list[int], str]],
                 admin: bool = False, disabled: frozenset[int] = frozenset()) -> None:
        self.dir = Path(directory)
        self.fronts = fronts
        self.admin_socket = str(self.dir / "admin.sock") if admin else ""
        self.disabled = disabled
        self.process: subprocess.Popen | None = None

    @classmethod
    def round_robin(cls, directory: Path, ports: list[int],
                    option: str = "send-proxy-v2", **kwargs) -> Balancer:  # fmt: skip
        """One front port (``.port``) over ``ports``; ``kwargs``: ``admin``, ``disabled``."""
        balancer = cls(directory, {free_port(): (ports, option)}, **kwargs)
        return balancer

    @property
    def port(self) -> int:
        return next(iter(self.fronts))

    def start(self) -> None:
        assert installed(), NOT_INSTALLED
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(config(self.fronts, self.admin_socket, self.disabled))
        with open(self.dir / "haproxy.err", "ab") as err:
            self.process = subprocess.Popen([shutil.which("haproxy") or HAPROXY, "-f",
                                             str(cfg), "-db"], stdout=err, stderr=err)
        for front in self.fronts:
            wait_for(lambda f=front: self._listening(f), what=f"haproxy on port {front}")

    def _listening(self, port: int) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"haproxy exited {self.process.returncode}")
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.9", 0))  # not a client address any test counts
            probe.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def runtime(self, command: str) -> str:
        """One command to the runtime API (``admin = True``), and its answer."""
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(self.admin_socket)
            conn.sendall(command.encode() + b"\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        return answer.decode(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None
