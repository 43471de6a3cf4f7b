"""What the suppression, stats and archive commands share: the feature files and users."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from mailrelay.admin import _directory as directory
from mailrelay.admin.cli import CommandError, Context
from mailrelay.config import duration
from mailrelay.features.paths import FeaturePaths, feature_paths
from mailrelay.model import canonical_username


def paths(context: Context) -> FeaturePaths:
    return feature_paths(context.config)


class UnknownUser(CommandError):
    """The directory answered: there is no such user."""


def user_account(context: Context, username: str) -> tuple[str, str]:
    """``(canonical username, account)`` of a user, from the configured directory."""
    if directory.is_ldap(context):
        user = directory.read_directory(context, lambda d: d.getUser(username))
    else:
        store = directory.store(context)
        user = store.data.users.get(canonical_username(username))
    if user is None:
        raise UnknownUser(f"unknown user {username!r} (see mailrelay-admin user list)")
    return user.username, user.account


def since(text: str) -> float:
    """``2026-11-01``, ``2026-11-01T10:00`` (UTC unless an offset is given) or a duration
    back from now (``7d``, ``12h``): unix time."""
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*[smhd]?\s*", text):
        return datetime.now(UTC).timestamp() - duration(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(f"--since {text!r}: not a date (2026-11-01) or a duration (7d)")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
