"""What the panel's forms send, read into the documents ops.py takes (the API's shapes).

Only typing happens here (a number field that is not a whole number is refused with 400);
the rules on the values themselves are ops.py's, shared with the API.
"""

from __future__ import annotations

from typing import Any

from mailrelay.model import Kind
from mailrelay.web.routing import HttpError

TOGGLES = [("archive", "Archive a copy of every message"),
           ("unsubscribe_footer", "Unsubscribe footer"),
           ("open_tracking", "Open tracking"), ("click_tracking", "Click tracking")]  # fmt: skip
ACCOUNT_FIELDS = ("domains", "notify", "bounce_domain", "note")


def user_settings(form: dict[str, str], kind: Kind) -> dict[str, Any]:
    """The user settings an add or edit form sends, typed as the API takes them."""
    out: dict[str, Any] = {}
    texts = ["account", "note", "status", "quota_action", "audit_bcc", "bounce_notify", "expires",
             "allow_from"]
    if kind is Kind.NAMED:
        texts += ["domains", "addresses"]
    for name in texts:
        if name in form:
            out[name] = form[name]
    for name, optional in (("priority", False), ("rate_limit", True), ("max_connections", True),
                           ("quota_day", True), ("quota_month", True)):  # fmt: skip
        text = form.get(name, "").strip()
        if not text and optional:
            out[name] = None
        elif text or not optional:
            out[name] = _whole(name, text)
    for name, _ in TOGGLES:
        out[name] = form.get(name) == "on"
    return out


def _whole(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise HttpError(400, f"{name.replace('_', ' ')} must be a whole number")


def account(form: dict[str, str], new: bool) -> dict[str, Any]:
    """An account's fields (and its name when ``new``), empty when not sent; its quotas
    as numbers (empty: none)."""
    names = ("name", *ACCOUNT_FIELDS) if new else ACCOUNT_FIELDS
    doc: dict[str, Any] = {k: form.get(k, "") for k in names}
    for name in ("quota_day", "quota_month"):
        text = form.get(name, "").strip()
        doc[name] = _whole(name, text) if text else None
    return doc


def suppression(form: dict[str, str]) -> dict[str, Any]:
    """An address for a user, an account (the user's when only it is given) or everyone
    (both empty)."""
    return {"address": form.get("address", ""), "user": form.get("user") or None,
            "account": form.get("account") or None}  # fmt: skip


def dkim_key(form: dict[str, str]) -> dict[str, Any]:
    """A new DKIM key's fields; an empty selector or bits field takes the default."""
    doc: dict[str, Any] = {"domain": form.get("domain", ""),
                           "type": form.get("type") or "rsa"}  # fmt: skip
    if form.get("selector", "").strip():
        doc["selector"] = form["selector"].strip()
    bits = form.get("bits", "").strip()
    if bits:
        try:
            doc["bits"] = int(bits)
        except ValueError:
            raise HttpError(400, "bits must be a whole number")
    return doc


def explain(form: dict[str, str]) -> dict[str, Any]:
    """The explain form: empty optional fields are left out (their defaults apply)."""
    doc: dict[str, Any] = {"username": form.get("username", ""),
                           "sender": form.get("sender", "")}  # fmt: skip
    for name in ("from_header", "ip"):
        if form.get(name, "").strip():
            doc[name] = form[name].strip()
    for name in ("recipients", "size"):
        value = form.get(name, "").strip()
        if value:
            try:
                doc[name] = int(value)
            except ValueError:
                raise HttpError(400, f"{name} must be a whole number")
    return doc
