"""What the suppression, stats and archive commands share: the feature files and users."""

from __future__ import annotations

from mailrelay.admin import _directory as directory
from mailrelay.admin.cli import CommandError, Context
from mailrelay.features.paths import FeaturePaths, feature_paths
from mailrelay.manage import stats


def paths(context: Context) -> FeaturePaths:
    return feature_paths(context.config)


def stores(context: Context) -> tuple:
    """The suppression and statistics stores the relay uses (service.open_feature_stores):
    the files, or PostgreSQL with ``[cluster] postgres``."""
    from mailrelay.service import StartupError, open_feature_stores

    try:
        return open_feature_stores(context.config)
    except StartupError as e:
        raise CommandError(str(e))


class UnknownUser(CommandError):
    """The directory answered: there is no such user."""


def user_account(context: Context, username: str) -> tuple[str, str]:
    """``(canonical username, account)`` of a user, from the configured directory."""

    async def find(users):
        return await users.store.getUser(username)

    user = directory.manage(context, find)
    if user is None:
        raise UnknownUser(f"unknown user {username!r} (see mailrelay-admin user list)")
    return user.username, user.account


def since(text: str) -> float:
    """``2026-11-01``, ``2026-11-01T10:00`` (UTC unless an offset is given) or a duration
    back from now (``7d``, ``12h``): unix time."""
    try:
        return stats.since(text)
    except ValueError:
        raise CommandError(f"--since {text!r}: not a date (2026-11-01) or a duration (7d)")
