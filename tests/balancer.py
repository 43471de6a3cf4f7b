"""Debian's HAProxy in TCP mode in front of relays, for the tests: each front port
forwards to one or more relay ports (round robin), with a PROXY option such as
``send-proxy-v2``. Started and stopped by PID; its log beside its configuration."""

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


def config(fronts: dict[int, tuple[list[int], str]]) -> str:
    """``fronts``: front port -> (relay ports, server options)."""
    text = ("defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
            "    timeout server 60s\n")
    for front, (ports, option) in fronts.items():
        text += (f"frontend f{front}\n    bind 127.0.0.1:{front}\n    default_backend b{front}\n"
                 f"backend b{front}\n    balance roundrobin\n")
        text += "".join(f"    server relay{i} 127.0.0.1:{port} {option}\n"
                        for i, port in enumerate(ports))
    return text


class Balancer:
    def __init__(self, directory: Path, fronts: dict[int, tuple[list[int], str]]) -> None:
        self.dir = Path(directory)
        self.fronts = fronts
        self.process: subprocess.Popen | None = None

    @classmethod
    def round_robin(cls, directory: Path, ports: list[int],
                    option: str = "send-proxy-v2") -> Balancer:  # fmt: skip
        """One front port (``.port``) over ``ports``."""
        balancer = cls(directory, {free_port(): (ports, option)})
        return balancer

    @property
    def port(self) -> int:
        return next(iter(self.fronts))

    def start(self) -> None:
        assert installed(), NOT_INSTALLED
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(config(self.fronts))
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

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None
