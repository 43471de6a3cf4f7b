"""``mailrelay-admin check``: validate the configuration before anything starts.

Whatever makes ``twistd`` refuse to start, ``check`` refuses first, with the same line: the
settings themselves (load_config, exit status 2), then each file the relay reads at startup,
read here by the same code (exit status 1). Nothing is created or changed: files the relay
makes on first start (the self-signed certificate, key files, the databases) are only
checked when they exist, and their directory when they do not.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet.task import Clock

from mailrelay.admin.cli import CommandError
from mailrelay.config import ConfigError
from mailrelay.features.paths import feature_paths


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="check the configuration and the files it names")
    p.set_defaults(func=run)


# mailrelay.service and mailrelay.tls (OpenSSL, the listeners) are imported where a step
# needs them: every mailrelay-admin command loads this module to register "check".


def run(args, context) -> int:
    from mailrelay.service import StartupError, check_spool_directory
    from mailrelay.tls import TLSSetupError

    config = context.config  # a ConfigError is printed by the entry point (exit 2)
    problems = []
    for step in (_tuning, _tls, _directory, _data_dir, check_spool_directory,
                 _postgres, _feature_stores, _quotas, _tracking, _admin, _bounces,
                 _webhooks):  # fmt: skip
        try:
            step(config)
        except (ConfigError, StartupError, TLSSetupError, _Problem) as e:
            problems.append(str(e))
    if problems:
        raise CommandError("; ".join(problems))
    print(f"{config.source}: ok ({len(config.listeners)} listeners, "
          f"directory={config.directory.backend}, delivery={config.delivery.mode})")
    return 0


class _Problem(Exception):
    """Something check alone reports (the relay would find it later, or differently)."""


def _tuning(config) -> None:
    from mailrelay import tuning
    from mailrelay.service import StartupError

    if problem := tuning.startup_problem():
        raise StartupError(problem)


def _tls(config) -> None:
    from mailrelay.service import StartupError
    from mailrelay.tls import server_options

    t = config.tls
    if not t.generate or (os.path.exists(t.certificate) and os.path.exists(t.key)):
        try:
            server_options(t.certificate, t.key, False, config.server.hostname, t.key_type)
        except OSError as e:
            raise StartupError(str(e))


def _postgres(config) -> None:
    """Reachable, and no store's schema newer than this code's; nothing is migrated."""
    from mailrelay.service import open_postgres

    open_postgres(config)


def _directory(config) -> None:
    if config.directory.backend == "ldap":
        return  # checked by binding, which the relay does at startup (a running server)
    from mailrelay.directory.filedir import DirectoryFileError, read_file

    users = config.directory.file
    try:
        read_file(users)
    except DirectoryFileError as e:  # as mailrelay.directory.open_directory says it
        raise ConfigError(config.source, "directory", "file", str(e))
    if os.path.exists(users) and not os.access(users, os.R_OK | os.W_OK):
        raise _Problem(f"[directory] file {users}: not readable and writable")


def _data_dir(config) -> None:
    parent = config.server.data_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise _Problem(f"[server] data_dir {config.server.data_dir}: {parent} is not writable")


def _feature_stores(config) -> None:
    """Read-only: an existing database file that SQLite cannot read, or from a newer
    mailrelay (features/db.py)."""
    from mailrelay.features.stats import StatsStore
    from mailrelay.features.suppressions import SuppressionStore
    from mailrelay.service import store_error

    if config.cluster and config.cluster.postgres:
        return  # kept in PostgreSQL, not in these files
    paths = feature_paths(config)
    for kind, key, path in ((SuppressionStore, "suppressions_db", paths.suppressions_db),
                            (StatsStore, "stats_db", paths.stats_db)):  # fmt: skip
        if not os.path.exists(path):
            continue
        try:
            kind.check_file(path)
        except sqlite3.Error as e:
            raise store_error(key, path, e)


def _quotas(config) -> None:
    """Read-only, as _feature_stores: the quota counts of data_dir (policy/quota.py)."""
    from mailrelay.policy.quota import QuotaStore
    from mailrelay.service import StartupError, quota_path

    path = quota_path(config)
    if os.path.exists(path):
        try:
            QuotaStore.check_file(path)
        except sqlite3.Error as e:
            raise StartupError(f"[server] data_dir: quota counts {path}: {e}")


def _key_file(section: str, path: str) -> None:
    from mailrelay.service import read_key_file

    if os.path.exists(path):  # else the relay makes it on first start
        read_key_file(section, path)


def _tracking(config) -> None:
    from mailrelay.service import make_footer

    if config.tracking.enabled:
        make_footer(config)
        _key_file("tracking", feature_paths(config).token_key)


def _bounces(config) -> None:
    from mailrelay.bounces.store import ReturnPathStore
    from mailrelay.service import StartupError

    _key_file("bounces", config.bounces.key_file)
    path = config.bounces.db
    if os.path.exists(path) and not (config.cluster and config.cluster.postgres):
        try:
            ReturnPathStore.check_file(path)
        except sqlite3.Error as e:
            raise StartupError(f"[bounces] db {path}: {e}")


def _webhooks(config) -> None:
    from mailrelay.service import StartupError
    from mailrelay.webhooks.store import WebhookStore

    path = config.webhooks.db
    if config.webhooks.enabled and os.path.exists(path):
        try:
            WebhookStore.check_file(path)
        except sqlite3.Error as e:
            raise StartupError(f"[webhooks] db {path}: {e}")


def _admin(config) -> None:
    from mailrelay.web.site import admin_settings, open_access, verification_key_file

    settings = admin_settings(config)
    if not settings.enabled:
        return
    open_access(config, Clock())
    if settings.verify_senders:
        _key_file("admin", verification_key_file(config))
