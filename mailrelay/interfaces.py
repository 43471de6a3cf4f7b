"""The seams of mailrelay: listener -> session -> policy -> spool -> delivery.

Each interface has one job and can be swapped (file or LDAP directory; MX or smarthost
routing) without touching the code on the other side. The management stores (IUserStore,
ISuppressionLists, IAccessStore, IQueueControl, IHeldMail, IDkimKeys) are what
mailrelay-admin and the control panel both work through (mailrelay/manage/); their methods
return Deferreds, so a store that is not a local file fits behind them.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class DirectoryUnavailable(Exception):
    """The directory cannot answer now (LDAP down, timeout): a temporary failure (4xx)."""


class IDirectory(Interface):
    """Where SMTP users and accounts live. Every method returns a Deferred.

    Implementations must never block the reactor (hashing, LDAP calls go to threads).
    """

    writable = Attribute("True when mailrelay-admin may change users here (file); False for LDAP")
    stamps_every_change = Attribute(
        "True when SmtpUser.updated changes with every change to a user (the file: a "
        "fine-grained time written by each change), so a verified login may be trusted "
        "while the stamp stays the same. False (LDAP: modifyTimestamp has one-second "
        "resolution and may be unreadable): the directory's own caches are the only ones, "
        "so a change is in force within their time to live.")

    def authenticate(username: str, password: str):
        """Verify a password. Fires with the SmtpUser.

        Errbacks with twisted.cred.error.UnauthorizedLogin for an unknown user and for a
        wrong password alike (never revealing which), DirectoryUnavailable when it cannot
        tell now.
        """

    def getUser(username: str):
        """Fires with the SmtpUser or None (no password check)."""

    def getAccount(name: str):
        """Fires with the Account or None."""

    def listUsers(account: str | None = None):
        """Fires with a list of SmtpUser, sorted by username."""

    def listAccounts():
        """Fires with a list of Account, sorted by name."""


class ReadOnly(Exception):
    """The users and accounts are kept where this relay does not change them (LDAP)."""


class IUserStore(Interface):
    """Users and accounts as management reads and changes them (mailrelay-admin, the API,
    the panel: manage/users.py). Every method returns a Deferred, so a store that is not a
    local file (a database) fits behind it; the file store runs its blocking work in a
    thread (or at once, in mailrelay-admin).

    A change errbacks with directory.filedir.UnknownEntry (no such user or account),
    EntryConflict (it exists, or others still use it), another DirectoryFileError or a
    scope.ScopeError (refused: the text says why), OSError (the store cannot be written
    now), or ReadOnly (every change, when ``writable`` is False). A ``change`` callable runs
    inside the store's transaction on the current entry and returns the fields to change;
    it may raise those refusals too.
    """

    writable = Attribute("False when every change errbacks with ReadOnly (LDAP)")

    def getUser(username: str):
        """Fires with the SmtpUser or None."""

    def getAccount(name: str):
        """Fires with the Account or None."""

    def listUsers(account: str | None = None):
        """Fires with a list of SmtpUser, sorted by username."""

    def listAccounts():
        """Fires with a list of Account, sorted by name."""

    def passwordHash(username: str):
        """Fires with the user's stored password hash; None when the store does not show
        it (LDAP). Errbacks with UnknownEntry for an unknown user."""

    def addUser(user, password_hash: str, verify: bool):
        """Add a user; fires with it as stored (canonical name, time stamp). ``verify``:
        its senders wait for confirmation (verification.entries_to_verify)."""

    def updateUser(username: str, change, verify: bool):
        """``change(current SmtpUser)`` gives the fields to change (nothing: errbacks with
        NothingToChange). Fires with (before, after)."""

    def setPassword(username: str, password_hash: str):
        """Fires with the SmtpUser (with a new ``updated`` stamp: cached logins end)."""

    def deleteUser(username: str):
        """Fires with the SmtpUser deleted."""

    def confirmSender(username: str, entry: str):
        """Mark a waiting sender verified; fires with the SmtpUser, or None when that user
        or entry no longer waits."""

    def addAccount(account):
        """Fires with the Account added."""

    def updateAccount(name: str, change):
        """``change(current Account)`` gives the fields to change; fires with the Account."""

    def deleteAccount(name: str):
        """Fires with the Account deleted (refused while it has users)."""


class ISuppressionLists(Interface):
    """The suppression lists as management reads and changes them (manage/suppressions.py):
    a user's list (account and user), an account's (user None), the global one (both
    None). Every method returns a Deferred."""

    def list(account: str | None = None, user: str | None = None):
        """Fires with one list's features.suppressions.Suppression rows, by address."""

    def all(account: str | None = None):
        """Fires with every row: the global list, then each account's; with ``account``,
        only that account's rows (account-wide and per user, never the global list)."""

    def ofUser(user: str):
        """Fires with the rows stored for the user named ``user`` in any account (also
        those of a user that no longer exists)."""

    def add(address: str, account: str | None, user: str | None, reason):
        """Fires with False when the address already was on that list."""

    def remove(address: str, account: str | None = None, user: str | None = None):
        """Fires with False when the address was not on that list."""


class IDkimKeys(Interface):
    """The DKIM keys of the sending domains (manage/dkim.py over the key directory of
    mailrelay/dkim.py). Every method returns a Deferred; a refusal errbacks with
    DkimError (its text says why). The private key never leaves the store."""

    def list():
        """Fires with every dkim.DkimKey, by domain, then selector."""

    def ofDomain(domain: str):
        """Fires with the domain's keys (possibly none)."""

    def add(domain: str, account: str | None, selector: str | None, kind: str, bits: int,
            state: str | None = None):
        """Make a key (RSA of ``bits``, or Ed25519) for ``domain`` of ``account`` (None:
        the relay domain's); fires with the new DkimKey, in ``state``: active, or pending
        for a rotation (one pending key per domain); None: active unless the domain has an
        active key of that type already, else pending. ``selector`` None: one made of the
        date."""

    def promote(domain: str, selector: str):
        """The pending key signs from now on; the active keys of its type become retiring.
        Fires with ``(key, [replaced keys])``."""

    def retire(domain: str, selector: str):
        """Delete a retiring key and its file; fires with the DkimKey removed."""

    def remove(domain: str, selector: str):
        """Delete a key and its file; fires with the DkimKey removed."""

    def txtRecord(key):
        """Fires with ``(name, value)``: the DNS TXT record to publish for ``key``."""

    def recordChecks(results: dict, when: float | None = None):
        """Keep the look-up results ``{(domain, selector): published}`` made at ``when``
        (default: now) in the keys' ``dns_status`` and ``dns_checked``; fires with the keys
        changed."""


class IAccessStore(Interface):
    """Who may use the control panel: API keys and admin logins, as mailrelay-admin changes
    them (manage/access.py; the daemon reads them through its own cached view). Every
    method returns a Deferred; a refusal errbacks with manage.access.AccessError, a store
    that cannot be written now with OSError."""

    def listKeys():
        """Fires with the ApiKeys, sorted by name (never the keys themselves)."""

    def addKey(name: str, access, account=None):
        """Make a key (limited to ``account`` when given); fires with the key itself, which
        is not stored (only its hash)."""

    def deleteKey(name: str):
        """Fires with the ApiKey revoked."""

    def listAdmins():
        """Fires with the Admins, sorted by name."""

    def setAdmin(name: str, password_hash: str, new: bool, account=None):
        """Add an admin (``new``, limited to ``account`` when given) or change an admin's
        password (its account stays); fires with the Admin."""

    def deleteAdmin(name: str):
        """Fires with the Admin deleted."""


class IIncomingMessage(Interface):
    """A message being received into the spool; nothing is queued until commit() fires."""

    id = Attribute("The queue id, known before the body arrives (for Received: and logs)")
    size = Attribute("Bytes of body written so far")

    def write(data: bytes) -> None:
        """Append body bytes: canonical CRLF lines, not dot-stuffed."""

    def rewrite(change) -> None:
        """Replace the body written so far by what ``change(old, write)`` writes from the
        old body (a binary file). Blocking: called in a thread."""

    def commit():
        """Fsync the file, rename it into the queue, fsync the directory (batched with other
        commits). Fires with the queue id once durable; only then may the 250 be sent.
        Errbacks (e.g. disk full) leave nothing in the queue."""

    def abort() -> None:
        """Discard the message (client vanished, over size, policy refusal)."""


class ISpool(Interface):
    """The durable queue (see mailrelay/spool/README.md for the on-disk layout)."""

    def create(envelope):
        """Start a new message for ``envelope`` (a model.Envelope whose id is filled in by
        the spool when empty). Returns an IIncomingMessage."""


class IQueueControl(Interface):
    """Acting on queued messages (the delivery process, the relay's control socket, the
    panel). Every method returns a Deferred."""

    def retry(queue_id: str):
        """Fires with True when the message is now due, False when it is not queued."""

    def flush():
        """Every deferred message is due now; fires with how many were waiting."""

    def delete(queue_id: str):
        """Stop delivering the message and remove it; fires with the place it was in
        ("queue" or "hold"), errbacks with KeyError when it is unknown."""


class IHeldMail(Interface):
    """Releasing mail held over a quota (policy/quotahold.py in the relay; the relay's
    control socket and the panel reach it through manage.queue.QueueControl). Returns
    Deferreds."""

    def release(queue_id: str | None):
        """Deliver a message held over its user's quota now, counted in the current
        period whatever its quota says; None: every such message. Fires with the ids
        released; errbacks with KeyError when the message is not in hold/,
        control.NotQuotaHeld when it is held for another reason (a sandboxed user's)."""


class IRouter(Interface):
    """Chooses where mail for a recipient domain goes (MX lookup, smarthost, per-domain route)."""

    def route(domain: str):
        """Fires with a list of delivery.Hop in the order to try; errbacks with
        delivery.PermanentRouteError (null MX, NXDOMAIN) or a temporary error."""


class ISubmissionPolicy(Interface):
    """The policy of all sessions (shared counters: connections, rate limits, failed logins).

    One object serves every listener; it hands each connection its own ISessionPolicy, which
    holds that connection's places in the counters (a connection ticket, a rate reservation).
    """

    def connect(client_ip: str):
        """A new connection from ``client_ip``. Returns (or fires with) the connection's
        ISessionPolicy. Raises (or errbacks with) reply.Reply, e.g. ``421 4.7.0``, to
        refuse it: the session sends that reply instead of the greeting and closes."""


class ISessionPolicy(Interface):
    """The policy of one connection, called by the session at each step.

    Every method may return a Deferred; the session reads no further command until it
    fires. A method refuses its step by raising (or errbacking with) reply.Reply: the
    session sends that reply, and a ``421`` also closes the connection. Any other exception
    is logged and answered with a temporary ``451 4.3.0``.
    ``avatar`` is the auth.avatar.ISubmitter of the login (by password or by IP address).
    """

    def authAttempt(username: str):
        """AUTH credentials arrived and are about to be checked. Returns the seconds to wait
        before checking them (0 or None: at once); a Reply (``421 4.7.0`` for a blocked
        address) refuses the attempt without checking them."""

    def authFailed(username: str):
        """The credentials were wrong (or the user unknown, or the authzid not allowed),
        before the ``535`` is sent. May return seconds to wait before sending it."""

    def authSucceeded(avatar):
        """A login succeeded (AUTH, or IP authentication at MAIL), before the session
        accepts it. A Reply refuses the login (``421 4.7.0``: too many connections for the
        user); the session then stays unauthenticated."""

    def mailFrom(avatar, sender: str):
        """MAIL FROM, after the session's own checks (login, syntax, parameters, messages
        per connection) and the sender checks (status, null sender, scope, verification:
        policy/sender.py) passed: rate limits. Success opens a transaction that ends with
        accepted() or reset()."""

    def senderRefused(avatar, address: str, header: bool):
        """The sender checks refused a sender outside the avatar's scope: the envelope MAIL
        FROM (``header`` False) or an address of the From: header (``header`` True). For
        domain sender notifications; the result is ignored and cannot change the reply."""

    def rcptTo(avatar, recipient: str, count: int):
        """One more RCPT after the session's checks; ``count`` recipients already accepted."""

    def holding():
        """The open transaction's message goes over a quota of a user whose quota_action
        is hold: the policy.quota.QuotaExceeded it would have been refused with (the
        session keeps the message in hold/ and says so in its 250); None otherwise."""

    def data(avatar, envelope):
        """The message arrived complete and passed the session's checks, just before it
        is committed to the spool (``envelope`` is the model.Envelope with its queue id).
        A Reply refuses it and nothing is kept."""

    def accepted(avatar, envelope):
        """The message is durable in the spool; the ``250`` is being sent."""

    def reset():
        """The open transaction (after a successful mailFrom) ended without accepted():
        RSET, HELO/EHLO, STARTTLS, a refusal at RCPT/DATA or after the data, a failed
        commit, a timeout, or the connection closing. Release what mailFrom reserved."""

    def disconnect():
        """The connection is gone (after reset() if a transaction was open). Free its
        places. Called exactly once for each session policy connect() returned."""


class ISenderChecks(ISessionPolicy):
    """The session policy the SMTP session holds: the sender checks (policy/sender.py)
    around the configured ISessionPolicy. Its mailFrom refuses senders the login may not
    use before the wrapped policy hears of them."""

    def headerFrom(avatar, address: str):
        """An address of the From: header, while the message data arrives: synchronous (no
        Deferred). Raises reply.Reply to refuse the message."""


class IRateLimiter(Interface):
    """The per-user rate limits (policy/ratelimit.py in process; cluster/redis_counters.py
    shared by several nodes). Limit values are read from its attributes at each check."""

    unit = Attribute('"messages" (one unit per transaction) or "recipients" (per RCPT)')
    per_hour = Attribute("The default limit per hour (0 or None: none)")
    per_minute = Attribute("The default limit per minute (0 or None: none)")

    def transaction(user: str, per_hour=None, per_minute=None):
        """At MAIL FROM: returns (or fires with) an IReservation, holding one unit when
        counting messages. Raises (or errbacks with) reply.Reply ``451 4.7.1`` over a
        limit, ``451 4.3.0`` when the shared counters cannot answer."""


class IReservation(Interface):
    """The units one transaction holds; each method may return a Deferred."""

    def recipient():
        """At each RCPT: one more unit when counting recipients (a Reply over a limit)."""

    def commit():
        """The message is spooled: its units count from now."""

    def release():
        """The transaction was aborted: give the units back (safe to call again)."""


class IQuotaCounter(Interface):
    """The daily and monthly quotas of users and accounts (policy/quota.py in process;
    cluster/redis_counters.py shared by several nodes). The defaults are read from its
    attributes at each check."""

    per_day = Attribute("The users' default quota per UTC day (0 or None: none)")
    per_month = Attribute("The users' default quota per UTC month (0 or None: none)")

    def reserve(user, account):
        """At MAIL FROM: returns (or fires with) an IQuotaReservation holding a place in
        each quota of a message of ``user`` (an SmtpUser) of ``account``. Raises (or
        errbacks with) policy.quota.QuotaExceeded ``451 4.7.1`` when one is used up,
        reply.Reply ``451 4.3.0`` when the shared counters cannot answer."""

    def count(user, account):
        """One message of ``user`` counted in each of its quotas whatever they say (an
        admin releases a message held over a quota). Returns (or fires with) the
        policy.quota.Crossing list of the thresholds it crossed."""

    def usage(user, account):
        """Returns (or fires with) the policy.quota.Usage of each of those quotas, changing
        nothing (mailrelay-admin explain)."""


class IQuotaReservation(Interface):
    """One transaction's places in its quotas; each method may return a Deferred."""

    usage = Attribute("The quotas' policy.quota.Usage when the places were taken")

    def commit():
        """The message is spooled: it counts once. Returns (or fires with) the
        policy.quota.Crossing of each warning threshold it reached."""

    def release():
        """The transaction was aborted: give the places back (safe to call again)."""


class IConnectionLimits(Interface):
    """Connections in total, per client address and per user, messages per connection."""

    def open(ip: str):
        """Returns (or fires with) the connection's ticket, which has ``close()``.
        Raises (or errbacks with) reply.Reply ``421`` to refuse the connection."""

    def bind_user(ticket, username: str, limit=None):
        """The connection logged in as ``username``; a Reply ``421`` refuses it."""

    def count_message(ticket):
        """One more transaction on the connection (synchronous)."""


class ILoginGuard(Interface):
    """Failed logins per address and per username, and address blocks."""

    clock = Attribute("The IReactorTime the waits are timed with")

    def check(ip: str):
        """Returns (or fires with) the seconds to wait before checking a login; a Reply
        (``421 4.7.0``) for a blocked address."""

    def failed(ip: str, username: str):
        """A login failed; may return a Deferred (that never errbacks)."""

    def succeeded(ip: str, username: str):
        """A login succeeded; may return a Deferred (that never errbacks)."""

    def configure(window: float, delay_after: int, block_after: int, block_time: float,
                  max_delay: float, user_alert_after: int, ipv6_prefix: int):
        """New thresholds (a reload), keeping what was counted."""


class IMetrics(Interface):
    """What the relay counts for monitoring (mailrelay/metrics/). Every method is cheap and
    synchronous, called on the reactor thread at the event it counts; labels are a small
    fixed set (listener names, methods, status codes), never addresses or usernames."""

    def listener(name: str):
        """The IListenerMetrics of the SMTP listener ``name`` (one per listener)."""

    def login(method: str, result: str) -> None:
        """A login: ``method`` password, ip or address; ``result`` success, failure (bad
        credentials), refused (the policy said no) or error (the directory failed)."""

    def policyRefusal(reason: str) -> None:
        """A limit refused a step: connections, user_connections, login_blocked,
        login_delayed, rate_limit, messages_per_connection, quota."""

    def notification(kind: str) -> None:
        """A notice was queued: bounce, delay (DSNs) or sender (sender notifications)."""

    def delivery(outcome: str, destination: str, latency: float | None) -> None:
        """One recipient's delivery attempt: ``outcome`` sent, deferred, bounced or
        expired; ``destination`` mx, smarthost or route; ``latency`` (sent only) seconds
        from the message's reception to the remote 250."""

    def directory(seconds: float, ok: bool) -> None:
        """One call to the LDAP directory, how long it took and whether it answered."""

    def webhook(outcome: str) -> None:
        """One webhook request's outcome: sent (2xx), retried (to be tried again) or
        failed (given up: a 4xx, a 410, the last retry)."""


class IListenerMetrics(Interface):
    """The counters of one SMTP listener, as its sessions call them."""

    def opened(tls: bool) -> None:
        """A session started (``tls``: implicit TLS)."""

    def startedTLS() -> None:
        """A session turned to TLS with STARTTLS."""

    def closed(tls: bool) -> None:
        """A session ended (``tls``: whether it was in TLS then)."""

    def accepted(size: int, commit_seconds: float) -> None:
        """A message of ``size`` bytes is durable; its commit took ``commit_seconds``."""

    def refused(code: int, status: str | None) -> None:
        """A 4xx or 5xx reply (a refused command or message) with its enhanced status."""

    def login(method: str, result: str) -> None:
        """A login by one of its sessions (IMetrics.login)."""


class IEventSink(Interface):
    """Where the relay reports what happened to a message or a login (mailrelay/events.py
    names the kinds); the webhooks deliver them to the accounts' endpoints."""

    def emit(kind: str, account: str | None, user: str | None, data: dict) -> None:
        """Record one event of ``kind`` for ``account``/``user`` (None: not known) with its
        JSON-able ``data`` (queue id, recipient, remote reply, ...). Called in the reactor
        thread; never blocks and never raises: an event that cannot be kept is logged."""


class IWebhooks(Interface):
    """The accounts' webhook endpoints and their failed events, as mailrelay-admin, the
    API and the panel manage them (manage/webhooks.py over webhooks/store.py). Every call
    takes the account it is limited to (None: every account); each returns a Deferred."""

    def list(account: str | None = None):
        """The endpoints (webhooks.store.Endpoint), oldest first."""

    def get(endpoint_id: int, account: str | None = None):
        """One endpoint, or None."""

    def add(account: str, url: str, users: list[str], kinds: list[str]):
        """A new endpoint with a new secret; ValueError for a URL or kind refused."""

    def remove(endpoint_id: int, account: str | None = None):
        """True when it was there; its pending and failed events go with it."""

    def rotateSecret(endpoint_id: int, account: str | None = None):
        """The endpoint with a new secret (the old one signs too for ``secret_overlap``),
        or None."""

    def enable(endpoint_id: int, account: str | None = None):
        """Send to it again (after a 410 disabled it); True when it was there."""

    def failed(account: str | None = None, limit: int = 500):
        """Failed events (webhooks.store.Delivery), newest first."""

    def failedEvent(delivery_id: int, account: str | None = None):
        """One failed event (webhooks.store.Delivery), or None."""

    def retry(delivery_id: int, account: str | None = None):
        """Send a failed event again now: "retried", "unknown" or "disabled" (its endpoint
        is)."""
