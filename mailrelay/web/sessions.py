"""Web admin sessions: a random id in a cookie (HttpOnly, SameSite=Strict, Secure over
TLS), kept in memory (a restart logs everyone out), each with its own CSRF token that every
form carries back. Failed logins are not counted here: the login page uses the daemon's
LoginGuard (policy/bruteforce.py), as SMTP AUTH does.

A logged-in session remembers the fingerprint of the credential its admin logged in with
(manage.access.Admin.fingerprint) and is checked against the admin's current one on every
request: deleting an admin or giving it a new password (``mailrelay-admin admin del|passwd``,
noticed within a second, see manage.access.AccessFile) ends all of that admin's sessions."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.logger import Logger

log = Logger()

COOKIE = "mailrelay_session"
MAX_SESSIONS = 10000  # beyond it the oldest are forgotten (bounded memory)


@dataclass
class Session:
    id: str
    csrf: str
    expires: float
    admin: str | None = None  # None until logged in (the login form's session)
    credential: str = ""  # the admin's fingerprint at login (see Admin.fingerprint)
    account: str | None = None  # the one account the admin may manage; None: all
    flash: list[str] = field(default_factory=list)  # messages for the next page


class Sessions:
    """``credentials(admin)``: that admin's current fingerprint, None when there is no such
    admin; without it a logged-in session lasts its lifetime."""

    def __init__(self, clock, lifetime: float = 8 * 3600.0, secure: bool = False,
                 credentials: Callable[[str], str | None] | None = None) -> None:  # fmt: skip
        self.clock = clock
        self.lifetime = lifetime
        self.secure = secure
        self.credentials = credentials
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, cookie: bytes | None) -> Session | None:
        if not cookie:
            return None
        session = self._sessions.get(cookie.decode("ascii", "replace"))
        if session is None:
            return None
        if self.clock.seconds() >= session.expires:
            self._sessions.pop(session.id, None)
            return None
        if session.admin is not None and self.credentials is not None:
            current = self.credentials(session.admin)
            if current is None or not secrets.compare_digest(current, session.credential):
                self._sessions.pop(session.id, None)
                log.info("control panel: a session of {admin} ended: the admin was {what}",
                         admin=session.admin,
                         what="deleted" if current is None else "given a new password")
                return None
        return session

    def start(self, admin: str | None = None, credential: str = "",
              account: str | None = None) -> Session:  # fmt: skip
        """A new session (a new id: logging in never keeps the login form's id)."""
        now = self.clock.seconds()
        for sid in [s.id for s in self._sessions.values() if s.expires <= now]:
            del self._sessions[sid]
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32),
                          now + self.lifetime, admin, credential, account=account)  # fmt: skip
        self._sessions[session.id] = session
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def cookie(self, session: Session | None) -> str:
        value, age = (session.id, int(self.lifetime)) if session else ("", 0)
        cookie = f"{COOKIE}={value}; Path=/; Max-Age={age}; HttpOnly; SameSite=Strict"
        return cookie + ("; Secure" if self.secure else "")

    @staticmethod
    def csrf_ok(session: Session, token: str | None) -> bool:
        return token is not None and secrets.compare_digest(session.csrf, token)
