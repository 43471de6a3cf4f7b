"""The sessions' goodbye when the relay stops: ``421 4.3.2`` rather than a closed socket.

RFC 5321 (3.8) asks a server that must close a session to send 421 first. SessionDrain
is a service that stops after the listeners (it joins the relay before them, and
service.StopInOrder stops the last added first), so no session begins meanwhile. Its
stop tells every open session of the submission listeners to shut down
(server.SubmissionServer.shut_down): a session idle between commands gets the 421 and
is closed at once; one with a command in progress (message data being read, a lookup,
a commit) finishes it, and gets the 421 after its reply. After ``grace`` seconds
(``[server] shutdown_grace``) the sessions still busy get the 421 and are closed: a
message whose data was still coming is discarded, as when a client vanishes. A commit
in flight then is waited for: its 250 goes out before the 421, the message kept.

The stop's Deferred fires once every session is gone, or at the grace's end once no
commit is in flight; the services stopped after it (the policy, delivery, the spool)
were there for the sessions until then.

The bounce listener (bounces/listener.py) is not covered: its sessions are of another
kind, closed by the reactor as before.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

log = Logger()


class SessionDrain(Service):
    """Says goodbye to the sessions of ``factories`` (smtp/factory.SubmissionFactory; the
    list is read at stop, so listeners made after this service joined count)."""

    name = "sessions"

    def __init__(self, factories: list, grace: float, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.factories = factories
        self.grace = grace
        self.reactor = reactor

    def _sessions(self) -> list:
        return [s for f in self.factories for s in list(f.open_sessions)]

    def stopService(self) -> Deferred:
        super().stopService()
        sessions = self._sessions()
        if not sessions:
            return succeed(None)
        log.info("stopping: {count} open sessions, {grace:g}s to finish their commands",
                 count=len(sessions), grace=self.grace)
        done = Deferred()
        for session in sessions:
            session.shut_down()
        timer = self.reactor.callLater(self.grace, self._grace_over, done)

        def gone(_) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        DeferredList([f.emptied() for f in self.factories]).addCallback(gone)
        return done

    def _grace_over(self, done: Deferred) -> None:
        sessions = self._sessions()
        log.info("shutdown grace over: closing {count} sessions", count=len(sessions))
        commits = [d for s in sessions if (d := s.shut_down(grace_over=True)) is not None]

        def answered(_) -> None:
            if not done.called:
                done.callback(None)

        DeferredList(commits).addCallback(answered)
