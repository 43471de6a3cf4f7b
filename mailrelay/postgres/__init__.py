"""The PostgreSQL store several nodes share (``[cluster] postgres``): the same management
stores as the local files (users and accounts, suppressions, statistics, admin logins and
API keys, DKIM keys), in one database. db.py is the connection pool, the schema migrations
and the notifications that tell every node of a change."""

# The modules of the stores kept in PostgreSQL (``mailrelay-admin check`` imports them to
# know the schema versions this code can read).
STORE_MODULES = (
    "mailrelay.postgres.users",
    "mailrelay.postgres.logins",
    "mailrelay.postgres.secrets",
    "mailrelay.postgres.access",
    "mailrelay.postgres.dkim",
    "mailrelay.postgres.suppressions",
    "mailrelay.postgres.stats",
    "mailrelay.postgres.returnpaths",
    "mailrelay.webhooks.pgstore",
)
