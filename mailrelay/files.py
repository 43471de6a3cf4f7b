"""The relay's own small files (user file, admin access file, keys, TLS certificate): read
with the stat they were read at, replaced atomically and durably, changed under a lock.

Blocking: call them at start-up, from mailrelay-admin, or from a thread. Under them, the
durable-write primitives the spool and the features use too: a file written to a
temporary name, fsynced and renamed; a directory fsynced; a name removed quietly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator

FILE_MODE = 0o600  # private by default: messages, keys, password hashes


def fsync_dir(path: str) -> None:
    """Make the names created or removed in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_exclusive(path: str, mode: int = FILE_MODE):
    """A new binary file for writing; FileExistsError if the name is taken."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    return os.fdopen(fd, "wb", buffering=64 * 1024)


def write_durably(
    tmp_path: str,
    final_path: str,
    data: bytes,
    mode: int = FILE_MODE,
    owner: tuple[int, int] | None = None,
    replace: bool = True,
) -> bool:
    """Write ``data`` to ``tmp_path``, fsync it and rename it over ``final_path``, so that a
    reader sees the old content or the new one, never a part. The caller fsyncs the
    directory of ``final_path``.

    ``owner`` (uid, gid) is given to the file before it gets its name. With ``replace``
    False an existing ``final_path`` is kept (a link, not a rename: of two writers racing,
    the first wins) and the result says whether this call made it."""
    f = create_exclusive(tmp_path, mode)
    try:
        with f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.rename(tmp_path, final_path)
            return True
        try:
            os.link(tmp_path, final_path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp_path)
        return True
    except BaseException:
        unlink_quietly(tmp_path)
        raise


def unlink_quietly(path: str) -> bool:
    """Remove ``path`` if it is there; True if it was."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def close_quietly(f) -> None:
    """Close a file whose buffered data is being thrown away (the flush may fail again)."""
    with contextlib.suppress(OSError):
        f.close()


StatKey = tuple[int, int, int, int]  # what tells a changed file: mtime, size, inode, device


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def stat_key(path: str) -> StatKey | None:
    """The file's StatKey now; None when there is no file."""
    try:
        return _stat_key(os.stat(path))
    except FileNotFoundError:
        return None


def read_with_stat(path: str) -> tuple[bytes, StatKey] | None:
    """The file's content and the StatKey of what was read; None when there is no file.

    The stat is of the open file, so that a rename racing with the read is seen next time.
    """
    try:
        with open(path, "rb") as f:
            return f.read(), _stat_key(os.fstat(f.fileno()))
    except FileNotFoundError:
        return None


def save_file(path: str, data: bytes, mode: int = 0o600, replace: bool = True) -> bool:
    """Write ``path`` so that a reader sees the old content or the new one, never a part,
    and the change survives a crash: a temporary file beside it is fsynced and renamed,
    then the directory is fsynced. Missing directories are made (mode 0700).

    Run as root, the file keeps the owner of the one it replaces (or of its directory),
    so that a daemon running as its own user can still read what mailrelay-admin wrote.
    With ``replace`` False an existing file is kept (of two processes making it at once,
    the first wins); the result says whether this call wrote it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    written = write_durably(tmp, path, data, mode, _owner(path, directory), replace)
    fsync_dir(directory)
    return written


def _owner(path: str, directory: str) -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = os.stat(directory)
    return st.st_uid, st.st_gid


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` for the block, so that processes changing
    ``path`` (read, change, save) take turns and none loses another's change."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
