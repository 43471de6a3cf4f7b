"""Client-supplied text made safe for a log line or a mail header (used by every layer)."""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, the Unicode line and paragraph separators (which str.splitlines
# and some log readers take for line ends), and lone surrogates (bytes that were not
# UTF-8, kept by "surrogateescape": no UTF-8 file or message can hold them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(value: str, limit: int = 200) -> str:
    """``value`` with control characters (CR, LF, NUL ...) and anything no UTF-8 text can
    hold as ``?`` and cut to ``limit``: a username like ``"x\\nlogin failed ip=victim"``
    must not forge a second log line that fail2ban would act on, nor a second header, and
    no value may stop the log or a notification from being written."""
    value = _UNSAFE.sub("?", value)
    return value if len(value) <= limit else value[: limit - 3] + "..."
