"""Where the features keep their files, from the configuration.

Each path is ``[features] <key>`` when the configuration has that section and key, else a
file under ``[server] data_dir``. Shared by the daemon's composition and mailrelay-admin so
both open the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULTS = {
    "suppressions_db": "suppressions.sqlite",
    "stats_db": "stats.sqlite",
    "archive_dir": "archive",
    "token_key": "tracking.key",
}


@dataclass(frozen=True)
class FeaturePaths:
    suppressions_db: str
    stats_db: str
    archive_dir: str
    token_key: str


def feature_paths(config) -> FeaturePaths:
    section = getattr(config, "features", None)
    data_dir = config.server.data_dir
    return FeaturePaths(
        **{
            key: getattr(section, key, None) or os.path.join(data_dir, default)
            for key, default in DEFAULTS.items()
        }
    )
