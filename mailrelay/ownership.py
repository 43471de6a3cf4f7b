"""Started as root to bind ports 25, 465 and 587, the relay runs as its own user.

twistd builds the relay (``makeService``: the data directory, a self-signed key, the spool
directories, the SQLite databases), binds its listeners and the control socket
(``privilegedStartService``) as root, and only then switches to ``--uid``/``--gid``; the
delivery process is started after the switch, as that user. So once everything is bound,
and before the switch, ``DataOwner`` hands the whole of ``[server] data_dir`` to that user
(and the log file twistd opened, if any): the relay, its delivery process and
``mailrelay-admin`` run as that user can then write all of it, and ``control.sock`` is
theirs. Entries already owned right are left alone, so a restart costs one ``lstat`` per
file. Files run as root by ``mailrelay-admin`` meanwhile are mended the same way at the
next start.

Files named outside ``data_dir`` (a certificate under /etc/letsencrypt, a user file under
/etc/mailrelay) are not touched: they are read at startup as root, and again on a reload as
the relay's user, so that user must be able to read them.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


def target_ids(uid: int | None, gid: int | None) -> tuple[int, int] | None:
    """The (uid, gid) twistd switches to for its ``--uid``/``--gid`` (gid: the user's
    own when only ``--uid`` is given), or None when it stays as it is or is not root."""
    if os.geteuid() != 0 or (uid is None and gid is None):
        return None
    if uid is not None and gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return (-1 if uid is None else uid), (-1 if gid is None else gid)


def give(paths: list[str], uid: int, gid: int) -> int:
    """Give each of ``paths``, and everything under a directory among them, to ``uid`` and
    ``gid`` (-1: unchanged); symbolic links themselves, never what they point to. The
    number of entries changed.

    Whoever is ``uid`` can put anything in the directory before the next start as root: a
    link it made must not make root give it a file from elsewhere. So a symbolic link is
    changed itself, never its target, and a file with more than one name (a hard link to
    a file elsewhere) is left as it is, with a warning."""
    changed = 0

    def one(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        if (uid == -1 or st.st_uid == uid) and (gid == -1 or st.st_gid == gid):
            return
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            log.warn("{path} has {links} names: not given to uid {uid}", path=path,
                     links=st.st_nlink, uid=uid)
            return
        os.chown(path, uid, gid, follow_symlinks=False)
        changed += 1

    for top in paths:
        if not os.path.lexists(top):
            continue
        one(top)
        if os.path.isdir(top) and not os.path.islink(top):
            for parent, dirs, files in os.walk(top):
                for name in dirs + files:
                    one(os.path.join(parent, name))
    return changed


class DataOwner(Service):
    """Added last to the relay's services: its ``privilegedStartService`` runs after every
    listener and the control socket are bound, just before twistd switches user."""

    name = "data-owner"

    def __init__(self, paths: list[str], uid: int, gid: int) -> None:
        self.paths, self.uid, self.gid = paths, uid, gid

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            changed = give(self.paths, self.uid, self.gid)
        except OSError as e:
            # The relay would fail later, on a file it cannot write: better not start.
            message = (f"mailrelay: cannot give {e.filename} to uid {self.uid} gid "
                       f"{self.gid}: {e.strerror}")
            log.critical("{message}", message=message)
            print(message, file=sys.__stderr__)  # twistd's sys.stderr is the log by now
            raise SystemExit(1)
        if changed:
            log.info("gave {count} files under {paths} to uid {uid} gid {gid}",
                     count=changed, paths=", ".join(self.paths), uid=self.uid, gid=self.gid)
