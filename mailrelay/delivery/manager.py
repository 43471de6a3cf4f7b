"""The queue runner: takes due messages from the schedule, has them read, routed and sent,
records what came of them, retries and bounces. Its parts, each with one job:

- schedule.py: which message is due next. At start it is built from one listing of
  queue/ and the state files (Spool.scan); at most ``prefetch`` messages are being
  delivered at a time, so 100,000 queued messages cost two heaps of ids, not 100,000
  reads.
- loader.py: reads the messages taken, in batches (LOAD_BATCH a trip) in the reactor's
  thread pool, small bodies too while BODY_BUDGET has room.
- destinations.py: routes the recipients (a cache per domain) and queues one job per
  destination; connections pull jobs from it, at most ``max_per_host`` per destination
  and ``max_concurrency`` in all.
- outcome.py: what the results of an attempt make of the message's state (sent, bounced,
  deferred, expired; the next attempt with its backoff; the delay warning): pure.
- dsn.py: the bounces, delay notifications and "relayed" notices this module queues.
  Which recipients get one is the sender's to ask (RFC 3461 NOTIFY, dsnparams.py):
  NEVER: none; a list: the kinds listed (FAILURE, DELAY, SUCCESS); no NOTIFY: bounces,
  and delay notifications when ``delay_warning`` is set. A "relayed" notice (SUCCESS)
  comes from here only for a next hop that does not offer DSN; one that does gets the
  parameters and the notice is its to send. Where a notice goes (or that none goes)
  is the user's bounce_notify setting (dsn.notify_address), for every kind.

After every attempt the message is removed (every recipient done) or its state saved
After every attempt the message is removed (every recipient done) or its state saved
(Spool.save_state) before it is scheduled again; a DSN is committed before the state that
records the failure, so a crash can at worst send a bounce twice, never lose one. A bounce
that cannot be queued (the disk is full) keeps its recipients pending for
``retry_first``.

Crashes and duplicates: a connection sends its next MAIL (or QUIT, or gives its place to
another connection) only once the outcome of the job it has just delivered is on disk:
the report of a job with a recipient accepted returns a Deferred that holds the
connection (client.Report). So after ``kill -9`` at most one message per open
connection, ``max_per_host`` per destination, can have been delivered without being
recorded, and is sent again after the restart. Jobs without an accepted recipient hold
nothing: losing their outcome costs a retry, not a duplicate.

- The last job of a message to report concludes it (DSNs, then the removal or the saved
  state) and its connection waits for that.
- One message can be several jobs (one per destination, one per recipient copy with
  footer or tracking), often queued behind each other on the same connection, so waiting
  for the whole message could wait forever. A job that is not the last to report saves
  the state with its accepted recipients marked sent (a partial save: failures stay
  pending, so they are tried again and bounced only at the conclusion) and its
  connection waits for that save alone. One save of a message runs at a time; results
  reported meanwhile share the next one, and the conclusion waits for the save in
  flight. A message with n copies costs up to n saves, spread over the group commit.
- Saves and removals are group-committed (spool.groupsync), so connections waiting at
  the same time share the fsyncs. A save that fails is logged and releases its
  connections (the bound then holds only while the disk works).

Retry, flush and delete come from the relay (the panel and the control socket, control.py)
over the delivery process's socket; they return Deferreds, as the relay's side does.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay import dsnparams, events
from mailrelay.delivery import dsn, outcome
from mailrelay.delivery.client import Courier, Job, Outcome, Result
from mailrelay.delivery.destinations import Destination, Destinations, Routes
from mailrelay.delivery.loader import Loader
from mailrelay.delivery.outcome import RetryPolicy
from mailrelay.delivery.schedule import Schedule
from mailrelay.errors import StorageError
from mailrelay.events import NO_EVENTS, EventKind
from mailrelay.features.hooks import HARD_BOUNCE
from mailrelay.interfaces import IQueueControl
from mailrelay.metrics import NO_METRICS
from mailrelay.model import Envelope
from mailrelay.spool.state import DeliveryState

log = Logger()

# The loader's limits, here with the runner's other settings.
BODY_BUDGET = 16 * 2**20  # bytes of small bodies read ahead and held until delivered
LOAD_BATCH = 32  # messages read per trip to a loader thread


class _Attempt:
    """One message being delivered: loaded, routed, on connections, being concluded."""

    __slots__ = ("queue_id", "envelope", "state", "body", "held", "due", "outstanding",
                 "results", "deleted", "retry", "suppressed", "waiting", "writing")

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id
        self.envelope: Envelope | None = None
        self.state: DeliveryState | None = None
        self.body: bytes | None = None  # read with the envelope when small
        self.held = 0  # bytes of the read-ahead budget it holds (SMALL_BODY while loading)
        self.due: float | None = None  # when it was scheduled for (None: first attempt)
        self.outstanding = 0  # jobs not yet reported (+1 while they are being made)
        self.results: list[Result] = []
        self.deleted = False  # removed by an admin meanwhile: its results are dropped
        self.retry = False  # a retry came meanwhile: due again at once if still pending
        self.suppressed: list[str] = []  # recipients on a suppression list: done, not sent
        self.waiting: list[defer.Deferred] = []  # connections held until results are durable
        self.writing: defer.Deferred | None = None  # a partial save in flight


@implementer(IQueueControl)
class DeliveryManager:
    metrics = NO_METRICS  # the IMetrics counting the DSNs queued (service.py sets it)

    def __init__(self, spool, router, reactor, *, max_concurrency: int = 50,
                 max_per_host: int = 10, retry_first: float = 60.0, retry_max: float = 3600.0,
                 lifetime: float = 5 * 86400.0, delay_warning: float = 0.0,
                 dsn_delay_warning: float = 4 * 3600.0,
                 hostname: str = "localhost", postmaster: str | None = None,
                 connect_timeout: float = 30.0, command_timeout: float = 300.0,
                 max_messages_per_connection: int = 100, prefetch: int | None = None,
                 connection_cache_time: float = 0.0,
                 route_ttl: float = 60.0, stop_timeout: float = 10.0,
                 on_result: Callable[[str, Envelope, Result, str], None] | None = None,
                 features=None, dkim=None, return_paths=None, events=NO_EVENTS,
                 clock=None, rng: random.Random | None = None) -> None:
        self.spool = spool
        self.router = router
        self.reactor = reactor
        self.clock = clock or reactor
        self.courier = Courier(reactor, hostname, connect_timeout, command_timeout,
                               max_messages_per_connection)
        self.retry_policy = RetryPolicy(retry_first, retry_max, lifetime, delay_warning,
                                        dsn_delay_warning)
        self.hostname = hostname
        self.postmaster = postmaster or f"postmaster@{hostname}"
        self.prefetch = prefetch or max(100, max_concurrency * 20)
        self.connection_cache_time = connection_cache_time
        self.stop_timeout = stop_timeout
        self.on_result = on_result
        self.features = features  # features.hooks.MessageFeatures: suppressions, copies
        self.dkim = dkim  # delivery.dkimsign.DkimSigning: signs what is sent, last
        # bounces.store.ReturnPaths: VERP senders at an account's bounce domain
        self.return_paths = return_paths
        self.events = events  # IEventSink: what came of each recipient of a user's message
        self._rng = rng or random.Random()
        self.schedule = Schedule(self.clock, self._pump)
        self._active: dict[str, _Attempt] = {}
        self.loader = Loader(spool, reactor, loaded=self._loaded, failed=self._load_failed,
                             budget=BODY_BUDGET, batch=LOAD_BATCH)
        self.routes = Routes(router, self.clock, route_ttl)
        self.destinations = Destinations(self._connect, max_per_host=max_per_host,
                                         max_concurrency=max_concurrency)
        self._running = False
        self._idle_waiters: list[defer.Deferred] = []

    # ---- lifecycle and the outside world

    def start(self) -> defer.Deferred:
        """Schedule everything queued (one listing and the state files), then run.
        Fires once the queue is loaded."""
        self._running = self.destinations.running = True
        self.schedule.start()
        d = self.spool.scan()
        d.addCallback(self._scanned)
        d.addErrback(lambda f: log.failure("cannot read the queue", f))
        return d

    def stop(self) -> defer.Deferred:
        """Stop taking messages; connections finish the message in progress (dropped after
        ``stop_timeout``). Fires when every attempt's state is saved."""
        self._running = self.destinations.running = False
        self.schedule.stop()
        for dest in self.destinations:
            dest.release()
            self._drain(dest, None)  # not attempted: their recipients stay as they are
        self.courier.stop()
        grace = self.clock.callLater(self.stop_timeout, self.courier.abort)
        d = self.idle()

        def done(result):
            if grace.active():
                grace.cancel()
            return result

        return d.addBoth(done)

    def enqueue(self, message: str | Envelope) -> None:
        """A message (its id, or its envelope) was just committed to the queue."""
        queue_id = getattr(message, "id", message)
        if not self._known(queue_id):
            self.schedule.add(queue_id)
            self._pump()

    def flush(self) -> defer.Deferred:
        """Every deferred message is due now; fires with how many were waiting."""
        count = self.schedule.flush()
        self._pump()
        log.info("delivery: flush requested ({count} deferred messages)", count=count)
        return defer.succeed(count)

    def retry(self, queue_id: str) -> defer.Deferred:
        """One message is due now; fires with False if it is not in the queue."""
        if self.schedule.now(queue_id):
            self._pump()
        elif queue_id in self._active:
            # Being delivered: this attempt may have started before what the retry is
            # for, so one more follows at once if a recipient is still pending.
            self._active[queue_id].retry = True
        elif not self._known(queue_id):
            if self.spool.locate(queue_id) != "queue":
                return defer.succeed(False)
            self.enqueue(queue_id)
        log.info("delivery: retry of {queue_id} requested", queue_id=queue_id)
        return defer.succeed(True)

    def delete(self, queue_id: str) -> defer.Deferred:
        """Remove a message (queued or held) without delivering it; fires with where it was
        ("queue" or "hold"), errbacks with KeyError for an unknown id. Jobs of it not yet
        sent are dropped; a transaction already under way may still complete."""
        self.schedule.discard(queue_id)
        attempt = self._active.get(queue_id)
        if attempt is not None:
            attempt.deleted = True
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         self.spool.delete, queue_id)

    def idle(self) -> defer.Deferred:
        """Fires when nothing is being delivered and nothing is due (for tests and stop)."""
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    @property
    def counts(self) -> dict[str, int]:
        return {"ready": self.schedule.ready, "deferred": self.schedule.deferred,
                "active": len(self._active), "connections": self.destinations.connections}

    # ---- scheduling

    def _scanned(self, result: tuple[list[str], dict[str, DeliveryState]]) -> None:
        ids, states = result
        self.schedule.load((queue_id, states[queue_id].next_attempt if queue_id in states
                            else None) for queue_id in ids if queue_id not in self._active)
        log.info("delivery: {ready} messages ready, {deferred} deferred",
                 ready=self.schedule.ready, deferred=self.schedule.deferred)
        self._pump()
        self._check_idle()

    def _known(self, queue_id: str) -> bool:
        return queue_id in self._active or queue_id in self.schedule

    def _check_idle(self) -> None:
        if self._active or self.destinations.connections or (self.schedule.ready and self._running):
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    # ---- one attempt: load, route, deliver, conclude

    def _pump(self) -> None:
        while self._running and len(self._active) < self.prefetch:
            queue_id = self.schedule.pop()
            if queue_id is None:
                break
            attempt = self._active[queue_id] = _Attempt(queue_id)
            self.loader.add(attempt)

    def _forget(self, attempt: _Attempt) -> None:
        del self._active[attempt.queue_id]
        self.loader.release(attempt)

    def _load_failed(self, attempt: _Attempt, failure: Failure) -> None:
        self._forget(attempt)
        if failure.check(KeyError):
            log.info("{queue_id} is no longer queued", queue_id=attempt.queue_id)
        else:
            log.failure("cannot read {queue_id}", failure, queue_id=attempt.queue_id)
            if self._running:
                self.schedule.add(attempt.queue_id, self.clock.seconds()
                                  + self.retry_policy.retry_first)
        self._pump()
        self._check_idle()

    def _loaded(self, attempt: _Attempt, envelope: Envelope,
                state: DeliveryState | None) -> None:
        if not self._running or envelope.sandboxed or attempt.deleted:
            if envelope.sandboxed:
                log.info("{queue_id} is held (sandboxed): never delivered",
                         queue_id=attempt.queue_id)
            self._forget(attempt)
            self._pump()
            self._check_idle()
            return
        attempt.envelope = envelope
        attempt.state = state or DeliveryState.fresh(envelope.recipients)
        attempt.due = attempt.state.next_attempt
        defer.ensureDeferred(self._route_attempt(attempt))

    async def _route_attempt(self, attempt: _Attempt) -> None:
        """Route the pending recipients by domain, then hand one job per destination (all
        of the message's recipients that go there) to that destination's connections.
        Recipients on a suppression list are left out; with the per-recipient features
        (footer, tracking) or a VERP sender (the account's bounce domain) each recipient
        gets a job of its own, with its own copy or its own envelope sender."""
        pending, copies, failures = await self._features(attempt, attempt.state.pending())
        original, copies = await self._sign(attempt, pending, copies)
        groups, unroutable = await self.routes.group(pending, attempt.queue_id)
        failures += unroutable
        senders = await self._return_paths(
            attempt.envelope, [r for _, rcpts in groups.values() for r in rcpts])
        if not self._running or attempt.deleted:
            groups, failures = {}, []  # stopped or deleted meanwhile: nothing tried
            attempt.suppressed = []
        spooled = partial(self.spool.open_body, attempt.queue_id)
        body = attempt.body
        if original is not None:
            spooled = original.open
            body = original.to_bytes() if body is not None else None  # small: kept read
        envelope = attempt.envelope
        job = partial(Job, attempt.queue_id, context=attempt,
                      dsn_mail=dsnparams.mail_params(envelope.ret, envelope.envid),
                      dsn_rcpt={r: dsnparams.rcpt_params(p) for r, p in envelope.dsn.items()},
                      smtputf8=envelope.smtputf8, requiretls=envelope.requiretls)
        jobs: list[tuple[frozenset, list, Job]] = []
        for key, (hops, rcpts) in groups.items():
            shared = [r for r in rcpts if r not in copies and r not in senders]
            if shared:
                jobs.append((key, hops, job(envelope.sender, shared, spooled, body=body)))
            # A VERP sender is one recipient's: one transaction each, sharing the body.
            jobs += [(key, hops, job(senders[r], [r], spooled, body=body))
                     for r in rcpts if r in senders and r not in copies]
            jobs += [(key, hops, job(senders.get(r, envelope.sender), [r], copies[r].open))
                     for r in rcpts if r in copies]
        attempt.outstanding = len(jobs) + 1
        for key, hops, job in jobs:
            if job.requiretls:  # RFC 8689: a connection of its own, made for it
                key = key | {attempt.queue_id}
            self.destinations.add(key, hops, job)
        self._record(attempt, failures)

    async def _return_paths(self, envelope: Envelope, recipients: list[str]) -> dict[str, str]:
        """The VERP envelope sender of each recipient, for mail of an account with a
        bounce domain (none for the null sender: the relay's bounces stay null). The
        message is recorded first, so that its bounces find their sender; if that fails,
        it goes out with the client's sender (unsigned by VERP, not held back)."""
        paths = self.return_paths
        if paths is None or not envelope.return_path or not envelope.sender or not recipients:
            return {}
        # A client that asked for DSNs (RFC 3461) hears from the remote servers itself, as
        # it asked: those recipients keep its envelope sender.
        asked = envelope.ret is not None or envelope.envid is not None
        senders = {r: a for r in recipients
                   if not (asked or envelope.dsn.get(r))
                   and (a := paths.address(envelope, r)) is not None}
        if senders:
            try:
                await paths.record(envelope)
            except Exception:
                log.failure("{queue_id}: cannot record its return paths: sent with the "
                            "client's envelope sender", queue_id=envelope.id)
                return {}
        return senders

    async def _features(self, attempt: _Attempt,
                        pending: list[str]) -> tuple[list[str], dict, list[Result]]:
        """The recipients to send to (suppressed ones go to ``attempt.suppressed``), the
        personal copies by recipient, and the recipients deferred because either step
        failed. Costs nothing more than the suppression lookup for users without the
        per-recipient features."""
        features, envelope = self.features, attempt.envelope
        if features is None or not pending:
            return pending, {}, []
        try:
            pending, attempt.suppressed = await features.filter_recipients(envelope, pending)
        except Exception:
            log.failure("cannot read the suppression list for {queue_id}",
                        queue_id=attempt.queue_id)
            return [], {}, [Result(r, 451, "4.3.0 suppression list unavailable")
                            for r in pending]
        personal = [r for r in pending if r not in envelope.audit]  # auditors: the original
        if not personal or not features.needs_copies(envelope):
            return pending, {}, []
        try:
            parsed = await features.prepare(envelope, partial(self.spool.open_body,
                                                              attempt.queue_id))
            copies = {r: await features.copy_for(parsed, envelope, r) for r in personal}
        except Exception:
            log.failure("cannot make the recipients' copies of {queue_id}",
                        queue_id=attempt.queue_id)
            return [], {}, [Result(r, 451, "4.3.0 cannot read the queued message")
                            for r in pending]
        return pending, copies, []

    async def _sign(self, attempt: _Attempt, pending: list[str],
                    copies: dict) -> tuple:
        """The original signed for the recipients that share it (None: unsigned, or
        nobody shares it) and the copies signed (delivery/dkimsign.py)."""
        if self.dkim is None or not pending:
            return None, copies
        queue_id = attempt.queue_id

        def original() -> bytes:  # in a thread
            if attempt.body is not None:
                return attempt.body
            with self.spool.open_body(queue_id) as f:
                return f.read()

        shared = any(r not in copies for r in pending)
        return await self.dkim.sign(attempt.envelope, original if shared else None, copies)

    def _connect(self, dest: Destination) -> None:
        d = self.courier.send(dest.hops, partial(self._next_job, dest), self._report)
        d.addBoth(self._closed, dest)

    def _closed(self, did: Outcome | Failure, dest: Destination) -> None:
        self.destinations.closed(dest)
        if isinstance(did, Failure):
            log.failure("delivery connection failed", did)
            did = Outcome(errors=[str(did.value)])
        if not self._running:
            self._drain(dest, None)
        elif did.jobs == 0 and did.errors and dest.active == 0:
            # No hop would take a message: everything waiting for them is deferred.
            self._drain(dest, f"{did.status} {did.error}")
        self.destinations.settle(dest)
        self._check_idle()

    def _next_job(self, dest: Destination) -> Job | None:
        while (job := dest.pop()) is not None:
            attempt = job.context
            if not attempt.deleted:
                return job
            self._record(attempt, [])
        if not self._running or self.connection_cache_time <= 0:
            return None
        return dest.wait_for_job(self.clock, self.connection_cache_time)

    def _drain(self, dest: Destination, text: str | None) -> None:
        """Report every job still waiting for ``dest``: deferred with ``text``, or (None)
        not attempted at all."""
        while (job := dest.pop()) is not None:
            results = [] if text is None else [Result(r, 451, text) for r in job.recipients]
            self._report(job, results)

    def _report(self, job: Job, results: list[Result]) -> defer.Deferred | None:
        """A job's results; when some recipient got the message, a Deferred for its
        connection that fires once that is on disk (see the module docstring)."""
        return self._record(job.context, results, durable=any(r.sent for r in results))

    def _record(self, attempt: _Attempt, results: list[Result],
                durable: bool = False) -> defer.Deferred | None:
        attempt.results += results
        attempt.outstanding -= 1
        settled = None
        if durable and not attempt.deleted:
            settled = defer.Deferred()
            attempt.waiting.append(settled)
        if attempt.outstanding == 0:
            defer.ensureDeferred(self._conclude(attempt))
        elif settled is not None:
            # Other jobs of the message are still out, maybe queued behind this one on
            # the same connection: record the recipients sent so far now.
            attempt.state = outcome.mark_sent(attempt.state, results)
            if attempt.writing is None:
                d = defer.ensureDeferred(self._save_partial(attempt))
                attempt.writing = None if d.called else d
        return settled

    async def _save_partial(self, attempt: _Attempt) -> None:
        """Save the state while connections wait on it and other jobs are out; one save
        of a message at a time, each covering every result reported before it began."""
        while attempt.waiting and attempt.outstanding > 0:
            waiting, attempt.waiting = attempt.waiting, []
            try:
                if not attempt.deleted:
                    await self.spool.save_state(attempt.queue_id, attempt.state)
            except Exception:
                log.failure("cannot record the delivery of {queue_id}",
                            queue_id=attempt.queue_id)
            for d in waiting:
                d.callback(None)
        attempt.writing = None  # the rest (if any) is the conclusion's

    async def _conclude(self, attempt: _Attempt) -> None:
        queue_id = attempt.queue_id
        due = attempt.state.next_attempt  # when to try again if nothing is recorded
        removed = False
        try:
            if attempt.writing is not None:
                await attempt.writing  # one save of a message at a time
            if attempt.deleted:
                return  # its results are dropped
            now = self.clock.seconds()
            step = outcome.fold(attempt.state, attempt.results, now=now,
                                received_at=attempt.envelope.received_at, due=attempt.due,
                                policy=self.retry_policy, suppressed=attempt.suppressed,
                                jitter=self._rng.uniform(*outcome.JITTER),
                                notify_delay=partial(_asked, attempt.envelope, "DELAY"))
            if step is None:
                return  # stopped before anything was tried: nothing to record
            for result, status in step.logged:
                self._log(attempt, result, status)
            self._report_events(attempt, step)
            state = attempt.state = step.state
            if step.failed and not await self._notify(attempt, step.failed, "failed", now):
                # keep them until a bounce can be queued
                state = attempt.state = outcome.postpone(state, step.failed, now,
                                                         self.retry_policy)
            if step.delayed:
                await self._notify(attempt, step.delayed, "delayed", now)
            relayed = [r.recipient for r, word in step.logged if word == "sent" and not r.dsn
                       and _asked(attempt.envelope, "SUCCESS", r.recipient)]
            if relayed:  # the message went: a notice that cannot be queued is only logged
                await self._notify(attempt, relayed, "relayed", now)
            due = state.next_attempt
            if state.done:  # the removal records it: no state to save first
                await self.spool.remove(queue_id)
                removed = True
            else:
                await self.spool.save_state(queue_id, state)
        except Exception:
            log.failure("cannot record the delivery of {queue_id}", queue_id=queue_id)
            due = self.clock.seconds() + self.retry_policy.retry_first  # try again then
        finally:
            self._forget(attempt)
            waiting, attempt.waiting = attempt.waiting, []
            for d in waiting:
                d.callback(None)
            if self._running and not attempt.deleted and not removed:
                self.schedule.add(queue_id, None if attempt.retry else due)
            self._pump()
            self._check_idle()

    async def _notify(self, attempt: _Attempt, rcpts: list[str], action: str,
                      now: float) -> bool:
        """Queue a DSN. True when queued or when none may be sent (null sender,
        notifications off, or no recipient's NOTIFY asks for it)."""
        envelope, state = attempt.envelope, attempt.state
        kind = _KIND[action]
        if dsn.notify_address(envelope) is None:
            log.info("{queue_id}: no {kind} for {recipients} (null sender or notifications "
                     "off)", queue_id=attempt.queue_id, kind=kind, recipients=", ".join(rcpts))
            return True
        if action == "failed":  # the others are asked for already
            unasked = [r for r in rcpts if _asked(envelope, "FAILURE", r) is False]
            if unasked:
                log.info("{queue_id}: no bounce for {recipients} (NOTIFY without FAILURE)",
                         queue_id=attempt.queue_id, recipients=", ".join(unasked))
                rcpts = [r for r in rcpts if r not in unasked]
                if not rcpts:
                    return True
        try:
            new_id = await defer.maybeDeferred(
                dsn.queue, self.spool, envelope=envelope,
                recipients=[(r, state.recipients[r]) for r in rcpts], action=action,
                hostname=self.hostname, postmaster=self.postmaster, now=now,
                retry_until=envelope.received_at + self.retry_policy.lifetime)
        except (StorageError, OSError) as e:  # the spool refuses new mail (disk full)
            log.error("cannot queue the {kind} for {queue_id} yet: {error}",
                      queue_id=attempt.queue_id, kind=kind, error=e)
            return False
        except Exception:
            log.failure("cannot queue the {kind} for {queue_id}", queue_id=attempt.queue_id,
                        kind=kind)
            return False
        self.metrics.notification("bounce" if action == "failed" else "delay")
        log.info("{queue_id}: {kind} {dsn_id} queued for <{to}>", queue_id=attempt.queue_id,
                 kind=kind, dsn_id=new_id, to=dsn.notify_address(envelope))
        if self._running:
            self.enqueue(new_id)
        return True

    def _log(self, attempt: _Attempt, result: Result, status: str) -> None:
        log.info("{queue_id} to=<{recipient}> via {remote} {status}: {code} {text} "
                 "tls={tls}{policy}",
                 queue_id=attempt.queue_id, recipient=result.recipient,
                 remote=result.remote or "-", status=status, code=result.code,
                 text=result.text, tls="yes" if result.tls else "no",
                 policy=f" tls_policy={result.policy}" if result.policy else "")
        if self.on_result is not None:
            try:
                self.on_result(attempt.queue_id, attempt.envelope, result, status)
            except Exception:
                log.failure("on_result failed for {queue_id}", queue_id=attempt.queue_id)

    def _report_events(self, attempt: _Attempt, step: outcome.Next) -> None:
        """What the attempt made of each recipient, as events; a recipient that expires
        now is reported bounced alone (its last reply is in the bounce's)."""
        expired = {r.recipient for r, status in step.logged if status == "expired"}
        for result, status in step.logged:
            if status == "deferred" and result.recipient in expired:
                continue
            data = {"recipient": result.recipient,
                    **events.next_hop_reply(result.code, result.text),
                    "remote": result.remote, "attempt": step.state.attempts,
                    "tls": result.tls, "source": "delivery"}
            if status in ("bounced", "expired"):
                hard = data["reply"]["status"] in HARD_BOUNCE
                data.update(bounce="hard" if hard else "soft", expired=status == "expired")
            self._emit(attempt, _EVENTS[status], data)
        for rcpt in attempt.suppressed:
            self._emit(attempt, EventKind.SUPPRESSED, {"recipient": rcpt})

    def _emit(self, attempt: _Attempt, kind: EventKind, data: dict) -> None:
        """An event about a user's message (its fields and ``data``'s known ones)."""
        envelope = attempt.envelope
        if envelope.user is None:  # the relay's own: DSNs, notices, reports
            return
        self.events.emit(kind, envelope.account, envelope.user,
                         events.known(events.of_message(envelope), data))


_EVENTS = {"sent": EventKind.DELIVERED, "deferred": EventKind.DEFERRED,
           "bounced": EventKind.BOUNCED, "expired": EventKind.BOUNCED}

_KIND = {"failed": "bounce", "delayed": "delay notification", "relayed": "success notice"}


def _asked(envelope: Envelope, kind: str, rcpt: str) -> bool | None:
    """Whether the recipient's NOTIFY lists ``kind`` (None: it gave no NOTIFY)."""
    return dsnparams.wants(envelope.dsn.get(rcpt), kind)
