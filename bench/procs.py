"""Process and port helpers: free loopback ports, waiting for a banner, memory and CPU time
of a process tree read from /proc (RSS for one process, PSS summed over a tree of
processes)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

HOST = "127.0.0.1"


def free_port() -> int:
    """A port the kernel just handed out on loopback (for programs that need a number)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_banner(port: int, timeout: float, host: str = HOST) -> float:
    """Wait until ``host:port`` answers with a 220 greeting; returns when it did (monotonic).
    Raises TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                if s.recv(512).startswith(b"220"):
                    when = time.monotonic()
                    s.sendall(b"QUIT\r\n")
                    return when
        except OSError as e:
            last = e
        time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} gave no 220 within {timeout:.0f}s ({last})")


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _kb(value: str) -> int:
    return int(value.split()[0]) * 1024


def rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS)."""
    return _kb(_status(pid)["VmRSS"])


def hwm(pid: int) -> int:
    """Peak resident set size in bytes (VmHWM), since start or the last reset_hwm()."""
    return _kb(_status(pid)["VmHWM"])


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages divided among their users, so that a
    sum over the processes of a multi-process server is its real footprint."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return _kb(line.split(":", 1)[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct and indirect children of ``pid`` (read from /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants, with the
    children they have reaped: a Postfix process that served and exited still counts,
    in its parent's share."""
    ticks = 0
    for p in [pid, *children(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile: its parent counts it once it has reaped it
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all the machine's CPUs since boot (/proc/stat): two
    readings give how busy the cores were between them, whoever used them."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks[:8]) - idle, sum(ticks[:8])  # without guest time, counted in user


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time that was busy between two machine_cpu()."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def tree_memory(pid: int) -> int:
    """Memory of ``pid`` and its descendants: RSS for a lone process, else summed PSS."""
    kids = children(pid)
    if not kids:
        return rss(pid)
    return sum(pss(p) for p in [pid, *kids])


def has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def die_with_this_process() -> Callable[[], None]:
    """A preexec_fn for a child that must not outlive the bench even if the bench is killed
    (Linux PR_SET_PDEATHSIG: the child gets SIGKILL when the thread that started it ends;
    the bench's normal stop is a SIGTERM and a wait, this is only the safety net)."""
    import ctypes
    import signal

    parent = os.getpid()

    def preexec() -> None:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the bench died before prctl() took effect
            os._exit(1)

    return preexec


def terminate(proc, timeout: float) -> None:
    """Stop a child started here (a ``subprocess.Popen``): SIGTERM, then SIGKILL after
    ``timeout`` seconds."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tail(path: str, lines: int) -> str:
    """The last ``lines`` lines of a log file ("" when it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
