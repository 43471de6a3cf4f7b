"""Where the features keep their files: read from the configuration, which derives each
default under ``[server] data_dir`` (config.DATA_FILES). Shared by the daemon's
composition and mailrelay-admin so both open the same files.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeaturePaths:
    suppressions_db: str
    stats_db: str
    archive_dir: str
    token_key: str


def feature_paths(config) -> FeaturePaths:
    f = config.features
    return FeaturePaths(f.suppressions_db, f.stats_db, f.archive_dir, config.tracking.key_file)
