"""Where the features keep their files, from the configuration.

Each path is ``[features] <key>`` (the token key: ``[tracking] key_file``) when the
configuration sets it, else a file under ``[server] data_dir``. Shared by the daemon's
composition and mailrelay-admin so both open the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# field -> (section, key, default file name under data_dir)
DEFAULTS = {
    "suppressions_db": ("features", "suppressions_db", "suppressions.sqlite"),
    "stats_db": ("features", "stats_db", "stats.sqlite"),
    "archive_dir": ("features", "archive_dir", "archive"),
    "token_key": ("tracking", "key_file", "tracking.key"),
}


@dataclass(frozen=True)
class FeaturePaths:
    suppressions_db: str
    stats_db: str
    archive_dir: str
    token_key: str


def feature_paths(config) -> FeaturePaths:
    data_dir = config.server.data_dir
    return FeaturePaths(
        **{
            name: getattr(getattr(config, section, None), key, None)
            or os.path.join(data_dir, default)
            for name, (section, key, default) in DEFAULTS.items()
        }
    )
