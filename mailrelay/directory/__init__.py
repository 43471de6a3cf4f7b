"""Directories of SMTP users and accounts: the file backend and LDAP."""
