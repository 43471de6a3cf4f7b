"""What a user's features put in the envelope of each accepted message.

The service gives ``user_fields`` to the SMTP factory (``envelope_fields``); the session
calls it when it builds the envelope at DATA, so the spooled
message carries the settings it was accepted under: delivery needs no directory lookup,
and a user without features gets an envelope like any other.
"""

from __future__ import annotations

from mailrelay.model import Account, SmtpUser
from mailrelay.scope import is_address


def user_fields(user: SmtpUser, recipients: list[str], account: Account | None = None) -> dict:
    """Envelope keyword arguments: ``recipients`` (with the audit BCC addresses added as
    envelope recipients only: they appear in no header), ``audit`` (those added),
    ``bounce_to`` (None: DSNs to the sender; "": none; else that address),
    ``personalize`` (the per-recipient changes to make) and, when the account has a
    bounce domain, ``return_path`` (VERP at delivery)."""
    audit = [a for a in dict.fromkeys(user.audit_bcc) if a not in recipients]
    fields = {
        "recipients": [*recipients, *audit],
        "audit": audit,
        "bounce_to": bounce_to(user.bounce_notify),
        "personalize": [
            name
            for name, on in (
                ("footer", user.unsubscribe_footer),
                ("opens", user.open_tracking),
                ("clicks", user.click_tracking),
            )
            if on
        ],
    }
    if account is not None and account.bounce_domain:
        fields["return_path"] = account.bounce_domain
    return fields


def bounce_to(bounce_notify: str) -> str | None:
    setting = bounce_notify.strip()
    if setting.lower() == "off":
        return ""
    return setting if is_address(setting) else None  # "sender" (or unset)
