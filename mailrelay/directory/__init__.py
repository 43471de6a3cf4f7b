"""Directories of SMTP users and accounts: the file backend and LDAP."""

from __future__ import annotations

from mailrelay.config import Config, ConfigError
from mailrelay.interfaces import IDirectory


def open_directory(config: Config, reactor=None) -> IDirectory:
    """The directory ``[directory] backend`` names, built from the configuration.

    Raises ConfigError (one line naming the setting) when it cannot be opened: a user
    file that is not valid, LDAP settings that cannot work, or no LDAP support installed.
    With ``[cluster] postgres`` set, the users live in the database (postgres/users.py)
    unless the backend is LDAP, which stays read-only and wins; the database's directory
    is a service (its listener and poll): its owner starts it.
    """
    backend = config.directory.backend
    if backend == "ldap":
        try:
            from mailrelay.directory import ldapdir
        except ModuleNotFoundError as e:
            if e.name != "mailrelay.directory.ldapdir":
                raise
            raise ConfigError(
                config.source, "directory", "backend", "ldap: the LDAP directory is not installed"
            )
        try:
            return ldapdir.LdapDirectory.from_config(config.ldap, reactor=reactor)
        except ValueError as e:  # its message names the setting
            raise ConfigError(config.source, "ldap", None, str(e))

    shared = shared_users(config)
    if shared is not None:
        from mailrelay.directory.filedir import DirectoryFileError
        from mailrelay.postgres.db import UNAVAILABLE
        from mailrelay.postgres.users import PgDirectory

        try:
            return PgDirectory(shared, reactor)
        except (*UNAVAILABLE, DirectoryFileError) as e:
            raise ConfigError(config.source, "cluster", "postgres",
                              f"cannot read the users: {str(e).strip()}")

    from mailrelay.directory.filedir import DirectoryFileError, FileDirectory

    try:
        return FileDirectory(config.directory.file, reactor=reactor)
    except DirectoryFileError as e:
        raise ConfigError(config.source, "directory", "file", str(e))


def shared_users(config: Config):
    """The users' tables in ``[cluster] postgres`` (postgres.users.PgUsers, migrated), or
    None: LDAP, or local files. ConfigError when the database cannot be reached or read."""
    if config.directory.backend == "ldap" or not getattr(config.cluster, "postgres", ""):
        return None
    from mailrelay.postgres.db import UNAVAILABLE, of_config
    from mailrelay.postgres.users import PgUsers

    try:
        return PgUsers(of_config(config))
    except UNAVAILABLE as e:
        raise ConfigError(config.source, "cluster", "postgres", f"cannot reach the users' "
                          f"database: {str(e).strip()}")
