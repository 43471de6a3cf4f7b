"""Client-supplied text made safe for a log line or a mail header."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def printable(value: str, limit: int = 200) -> str:
    """``value`` with control characters (CR, LF, NUL ...) as ``?`` and cut to ``limit``:
    a username like ``"x\\nlogin failed ip=victim"`` must not forge a second log line that
    fail2ban would act on, nor a second header."""
    value = _UNSAFE.sub("?", value)
    return value if len(value) <= limit else value[: limit - 3] + "..."
