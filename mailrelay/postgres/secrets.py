"""The signing keys every node must share, kept in PostgreSQL with ``[cluster] postgres``.

A link or address signed on one node is checked on another: a sender verification link
([admin] key_file), a tracking or unsubscribe link ([tracking] key_file), a VERP return
path ([bounces] key_file). With a database each key is one row of ``mailrelay_secrets``,
made once (INSERT ... ON CONFLICT DO NOTHING, then read: nodes starting together end up
with the same key) and read at start. The first node to make it takes the key of its
local key file when it has one, so the links a single node sent before it joined a
cluster keep working; from then on the database's key is used and the files are not.
"""

from __future__ import annotations

import os
import secrets

from mailrelay.postgres.db import PgStore
from mailrelay.signing import KEY_BYTES, load_or_create_key


class SharedSecrets(PgStore):
    COMPONENT = "secrets"
    MIGRATIONS = {1: """
    CREATE TABLE mailrelay_secrets (
        name TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    """}

    def key(self, name: str, local_file: str = "") -> bytes:
        """The key ``name``, made now if no node made it yet: the key in ``local_file``
        if that file exists, else a new random one."""
        with self.db.transaction() as conn:
            found = conn.execute("SELECT value FROM mailrelay_secrets WHERE name = %s",
                                 (name,)).fetchone()
            if found is not None:
                return bytes(found[0])
        seed = (load_or_create_key(local_file) if local_file and os.path.exists(local_file)
                else secrets.token_bytes(KEY_BYTES))
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO mailrelay_secrets (name, value) VALUES (%s, %s) "
                         "ON CONFLICT (name) DO NOTHING", (name, seed))
            return bytes(conn.execute("SELECT value FROM mailrelay_secrets WHERE name = %s",
                                      (name,)).fetchone()[0])
