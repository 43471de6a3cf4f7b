"""Small blocking file helpers for the spool; call them from a thread, not the reactor."""

from __future__ import annotations

import contextlib
import os

FILE_MODE = 0o600  # messages are private mail


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
