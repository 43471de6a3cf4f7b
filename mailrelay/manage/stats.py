"""Statistics as management asks for them: from when (``stats --since``, the API)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from mailrelay.config import duration


def since(text: str) -> float:
    """``2026-11-01``, ``2026-11-01T10:00`` (UTC unless an offset is given) or a duration
    back from now (``7d``, ``12h``): unix time. ValueError for anything else."""
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*[smhd]?\s*", text):
        return datetime.now(UTC).timestamp() - duration(text)
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
