"""This node's id: the end of every queue id it makes (queueid.py).

``[server] node_id`` when set; otherwise one made at random on first start and kept in
``<data_dir>/node_id``, so it stays the same across restarts. The relay and its delivery
process both ask; whichever comes first writes the file, and the other reads it.
"""

from __future__ import annotations

import os
import secrets

from mailrelay.files import fsync_dir, write_durably
from mailrelay.spool.queueid import is_node_id

NODE_FILE = "node_id"
_DIGITS = "0123456789abcdefghijklmnopqrstuv"  # base32hex, lowercase: sorts as it reads


def node_id(data_dir: str, configured: str = "") -> str:
    """The configured id, or the one stored under ``data_dir`` (made when missing).
    ValueError when the stored file holds something else than a node id."""
    if configured:
        return configured
    path = os.path.join(data_dir, NODE_FILE)
    if not os.path.exists(path):
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        made = "".join(secrets.choice(_DIGITS) for _ in range(4))
        # A link, not a rename: of two processes making it, the first wins.
        write_durably(f"{path}.{secrets.token_hex(4)}", path, f"{made}\n".encode(),
                      replace=False)
        fsync_dir(data_dir)
    with open(path, encoding="ascii", errors="replace") as f:
        stored = f.read().strip()
    if not is_node_id(stored):
        raise ValueError(f"{path} holds {stored[:20]!r}, not a node id (4 of 0-9a-v)")
    return stored
