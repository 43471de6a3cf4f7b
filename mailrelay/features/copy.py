"""One recipient's copy of a message, kept as pieces of the original and read like a file.

A copy shares the original's bytes (attachments, untouched parts) through memoryviews and
owns only what it changed, so a message with a footer to 400 recipients costs 400 footers
and header blocks in memory, not 400 messages.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Copy:
    pieces: Sequence[bytes | memoryview]
    changed: bool
    reason: str | None = None  # why it was left unchanged, for the log

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.pieces)

    def open(self) -> PiecesReader:
        return PiecesReader(self.pieces)

    def to_bytes(self) -> bytes:
        return b"".join(self.pieces)


class PiecesReader(io.RawIOBase):
    """A read-only, seekable file over a sequence of byte strings."""

    def __init__(self, pieces: Sequence[bytes | memoryview]) -> None:
        super().__init__()
        self._pieces = [memoryview(p).cast("B") for p in pieces if len(p)]
        self._size = sum(len(p) for p in self._pieces)
        self._pos = 0
        self._index = 0  # the piece holding _pos
        self._offset = 0  # _pos within that piece

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        pos = min(max(base + offset, 0), self._size)
        self._pos, self._index, self._offset = pos, 0, pos
        while self._index < len(self._pieces) and self._offset >= len(self._pieces[self._index]):
            self._offset -= len(self._pieces[self._index])
            self._index += 1
        return pos

    def readinto(self, buffer) -> int:
        target = memoryview(buffer).cast("B")
        done = 0
        while done < len(target) and self._index < len(self._pieces):
            piece = self._pieces[self._index]
            n = min(len(piece) - self._offset, len(target) - done)
            target[done : done + n] = piece[self._offset : self._offset + n]
            done += n
            self._offset += n
            if self._offset == len(piece):
                self._index += 1
                self._offset = 0
        self._pos += done
        return done
