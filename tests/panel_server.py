"""The control panel of tests/panel.py as a process of its own, for clients that block
(a browser driven by Selenium, schemathesis): they cannot share the test's reactor.

    python tests/panel_server.py DIR INFO_FILE

seeds DIR like tests/panel.py, listens on an ephemeral 127.0.0.1 port and writes INFO_FILE
(JSON: url, keys, admin login, paths) once it answers; it runs until SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from panel import ADMIN_PASSWORD, PASSWORD, Panel  # noqa: E402
from twisted.internet import defer, reactor  # noqa: E402


@defer.inlineCallbacks
def start(directory: str, info_file: str):
    os.makedirs(directory, exist_ok=True)
    panel = yield Panel.start(directory)
    info = {
        "url": panel.url, "keys": panel.keys, "admin": "alice", "admin_password": ADMIN_PASSWORD,
        "user_password": PASSWORD, "user_file": panel.config.directory.file,
        "stats_db": panel.stats.path, "spool": panel.config.spool.directory,
    }  # fmt: skip
    tmp = info_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, info_file)
    reactor.addSystemEventTrigger("before", "shutdown", panel.stop)


def main() -> int:
    directory, info_file = sys.argv[1:3]
    reactor.callWhenRunning(lambda: start(directory, info_file).addErrback(
        lambda f: (f.printTraceback(file=sys.stderr), reactor.stop())))  # fmt: skip
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
