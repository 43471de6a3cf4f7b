"""How every mailrelay-admin command prints: tables for people, JSON for programs, times
in UTC."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def print_list(header: list[str], rows: list[list[str]], empty: str) -> None:
    """A table; when there is nothing to list, only ``empty`` (on standard error, so that
    a script reading standard output sees no rows)."""
    if rows:
        print_table(header, rows)
    else:
        print(empty, file=sys.stderr)


def when(timestamp: float) -> str:
    """A unix time as ``2026-11-01 10:00:00`` (UTC)."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")
