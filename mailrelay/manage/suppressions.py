"""Suppressions as management shows them (``suppression list --json``, the API)."""

from __future__ import annotations

from typing import Any

from mailrelay.features.suppressions import Suppression


def suppression_json(e: Suppression) -> dict[str, Any]:
    return {"address": e.address, "account": e.account, "user": e.user,
            "reason": e.reason.value, "created": e.created}  # fmt: skip
