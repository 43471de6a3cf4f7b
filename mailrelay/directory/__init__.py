"""Directories of SMTP users and accounts: the file backend and LDAP."""

from __future__ import annotations

from mailrelay.config import Config, ConfigError
from mailrelay.interfaces import IDirectory


def open_directory(config: Config, reactor=None) -> IDirectory:
    """The directory ``[directory] backend`` names, built from the configuration.

    Raises ConfigError (one line naming the setting) when it cannot be opened: a user
    file that is not valid, LDAP settings that cannot work, or no LDAP support installed.
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

    from mailrelay.directory.filedir import DirectoryFileError, FileDirectory

    try:
        return FileDirectory(config.directory.file, reactor=reactor)
    except DirectoryFileError as e:
        raise ConfigError(config.source, "directory", "file", str(e))
