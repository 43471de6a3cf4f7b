"""Errors that cross layers without being anyone's reply: each layer answers them its own way."""

from __future__ import annotations

import errno


class StorageError(Exception):
    """The spool could not keep a message, and kept nothing of it. ``full``: the disk is
    full (or below the spool's free space floor), so waiting helps; otherwise another
    fault. The session answers ``452 4.3.1`` or ``451 4.3.0``; delivery and the panel
    log it and try again later."""

    def __init__(self, reason: str, full: bool) -> None:
        super().__init__(reason)
        self.full = full

    @classmethod
    def of(cls, err: BaseException | None) -> StorageError:
        """The StorageError for ``err``, the failure of a write or a commit."""
        if isinstance(err, StorageError):
            return err
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        return cls(str(err) if err is not None else "unknown error", full)
