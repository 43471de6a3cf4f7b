"""SMTP TLS reporting (RFC 8460): what became of each TLS session under a policy a
recipient domain published, told to that domain once a day.

Counting: the courier reports each connection under a DANE or MTA-STS policy (its
success, or what failed: ``classify`` turns the reason into RFC 8460's result types), the
router each MX host MTA-STS enforce does not list (``validation-failure``, once per route
looked up), and the MTA-STS cache each policy it could not fetch. ``Counter`` appends
one JSON line per session to ``<dir>/<YYYY-MM-DD>.jsonl`` (UTC days), a batch per second,
in a thread.

Reporting: ``Reporter`` looks, at startup and every hour, for days before today whose
file has not been reported; for each policy domain of that day it builds the aggregate
report (4.4: JSON, gzip), looks up the domain's ``_smtp._tls`` TXT record (``v=TLSRPTv1;
rua=...``) and sends the report to each ``mailto:`` address as a message through the
relay's own queue (5.3: multipart/report, report-type=tlsrpt, null envelope sender so
that it can never cause a bounce), and POSTs it to each ``https:`` address (5.2, the
certificate verified). The day's file is then renamed ``.jsonl.sent``.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import json
import os
import secrets
from collections.abc import Callable, Iterable
from email.utils import format_datetime

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer
from twisted.web.http_headers import Headers

from mailrelay.delivery.dnssec import LookupFailure, NoSuchName
from mailrelay.model import Envelope

log = Logger()

FLUSH = 1.0  # seconds between appends of counted sessions
CHECK = 3600.0  # seconds between looks for days to report
MAX_RUA = 5  # report addresses used per domain


def classify(problem: str) -> str:
    """RFC 8460 4.3's result type for a failure's reason as the client words it."""
    text = problem.lower()
    if "starttls" in text:
        return "starttls-not-supported"
    if "does not match the host name" in text or "do not include" in text:
        return "certificate-host-mismatch"
    if "expired" in text:
        return "certificate-expired"
    if "certificate verify failed" in text or "unable to get" in text:
        return "certificate-not-trusted"
    if "tlsa" in text:
        return "tlsa-invalid"
    return "validation-failure"  # an MX host MTA-STS does not list, among others


def describe(policy) -> dict:
    """The ``policy`` object of a report (4.4) for a hop's dane.TlsPolicy."""
    if policy.sts is not None:
        sts = policy.sts
        return {"policy-type": "sts", "policy-string": sts.text.splitlines(),
                "policy-domain": policy.domain, "mx-host": list(sts.mx)}
    return {"policy-type": "tlsa",
            "policy-string": [f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}"
                              for r in policy.tlsa],
            "policy-domain": policy.domain}


def day_of(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d")


class Counter:
    """Counts sessions per policy domain per day, on disk under ``directory``."""

    def __init__(self, directory: str, clock, in_thread: Callable = threads.deferToThread):
        self.directory = directory
        self.clock = clock
        self.in_thread = in_thread
        self._lines: dict[str, list[str]] = {}
        self._timer = None
        self._writing: defer.Deferred | None = None

    def session(self, hop, problem: str | None) -> None:
        """Courier.on_session: one connection under ``hop.policy``."""
        entry = {"policy": describe(hop.policy), "mx": hop.host, "ip": hop.address or "",
                 "result": "success" if problem is None else classify(problem)}
        if problem is not None:
            entry["reason"] = problem[:200]
        self.add(entry)

    def fetch_failed(self, domain: str, error) -> None:
        """PolicyCache.on_failure: a policy that could not be fetched or read."""
        self.add({"policy": {"policy-type": "sts", "policy-string": [],
                             "policy-domain": domain}, "mx": "", "ip": "",
                  "result": error.kind, "reason": str(error)[:200]})

    def add(self, entry: dict) -> None:
        day = day_of(self.clock.seconds())
        self._lines.setdefault(day, []).append(json.dumps(entry, sort_keys=True))
        if self._timer is None:
            self._timer = self.clock.callLater(FLUSH, self.flush)

    def flush(self) -> defer.Deferred:
        """Appends what was counted (in a thread); fires once it is written."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        lines, self._lines = self._lines, {}
        previous = self._writing or defer.succeed(None)
        d = previous.addCallback(lambda _: self.in_thread(self._append, lines))
        d.addErrback(lambda f: log.failure("TLS reports: cannot write the counts", f))
        self._writing = d
        return d

    def _append(self, lines: dict[str, list[str]]) -> None:
        if not lines:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for day, entries in lines.items():
            with open(os.path.join(self.directory, f"{day}.jsonl"), "a") as f:
                f.write("".join(e + "\n" for e in entries))


def aggregate(entries: Iterable[dict]) -> dict[str, list[dict]]:
    """A day's sessions as each policy domain's ``policies`` list (4.4)."""
    by_policy: dict[tuple, dict] = {}
    for e in entries:
        policy = e["policy"]
        key = json.dumps(policy, sort_keys=True)
        item = by_policy.setdefault(key, {
            "policy": policy,
            "summary": {"total-successful-session-count": 0,
                        "total-failure-session-count": 0},
            "failure-details": {}})
        if e["result"] == "success":
            item["summary"]["total-successful-session-count"] += 1
            continue
        item["summary"]["total-failure-session-count"] += 1
        detail_key = (e["result"], e.get("mx", ""), e.get("ip", ""), e.get("reason", ""))
        detail = item["failure-details"].setdefault(detail_key, {"result-type": e["result"],
                                                                 "failed-session-count": 0})
        if e.get("mx"):
            detail["receiving-mx-hostname"] = e["mx"]
        if e.get("ip"):
            detail["receiving-ip"] = e["ip"]
        if e.get("reason"):
            detail["failure-reason-code"] = e["reason"]
        detail["failed-session-count"] += 1
    domains: dict[str, list[dict]] = {}
    for item in by_policy.values():
        item["failure-details"] = list(item["failure-details"].values())
        if not item["failure-details"]:
            del item["failure-details"]
        domains.setdefault(item["policy"]["policy-domain"], []).append(item)
    return domains


def report(day: str, policies: list[dict], organization: str, contact: str) -> dict:
    """The aggregate report (4.4) of one policy domain for ``day`` (YYYY-MM-DD, UTC)."""
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z",
                       "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": f"{day}.{policies[0]['policy']['policy-domain']}."
                     f"{secrets.token_hex(6)}@{organization}",
        "policies": policies,
    }


def parse_rua(strings: Iterable[str]) -> list[str]:
    """The report URIs of ``_smtp._tls`` TXT records (3): exactly one ``v=TLSRPTv1``
    record; mailto: and https: URIs."""
    found = [s for s in strings if s.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(found) != 1:
        return []
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key.strip() == "rua":
            uris = [u.strip() for u in value.split(",")]
            return [u for u in uris if u.startswith(("mailto:", "https:"))][:MAX_RUA]
    return []


def message(rep: dict, domain: str, to: str, submitter: str, sender: str,
            now: float) -> bytes:
    """The report as mail (5.3): multipart/report with the gzipped JSON attached."""
    data = gzip.compress(json.dumps(rep).encode())
    start = int(datetime.datetime.fromisoformat(
        rep["date-range"]["start-datetime"].replace("Z", "+00:00")).timestamp())
    name = f"{submitter}!{domain}!{start}!{start + 86399}!{rep['report-id'][:12]}.json.gz"
    boundary = f"{secrets.token_hex(12)}/{submitter}"
    encoded = base64.encodebytes(data).decode().replace("\n", "\r\n")
    text = (
        f"From: <{sender}>\r\nTo: <{to}>\r\n"
        f"Subject: Report Domain: {domain} Submitter: {submitter} "
        f"Report-ID: <{rep['report-id']}>\r\n"
        f"Date: {format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))}\r\n"
        f"Message-ID: <{secrets.token_hex(12)}@{submitter}>\r\n"
        f"TLS-Report-Domain: {domain}\r\nTLS-Report-Submitter: {submitter}\r\n"
        "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain}.\r\n"
        f"\r\n--{boundary}\r\nContent-Type: application/tlsrpt+gzip\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'
        f"{encoded}\r\n--{boundary}--\r\n")
    return text.encode("ascii")


class Reporter:
    """Sends each finished day's reports (see the module's docstring)."""

    def __init__(self, directory: str, lookup, submit: Callable[[Envelope, bytes], object],
                 clock, organization: str, contact: str, sender: str,
                 trust=None, in_thread: Callable = threads.deferToThread,
                 reactor=None) -> None:
        self.directory = directory
        self.lookup = lookup
        self.submit = submit
        self.clock = clock
        self.organization = organization
        self.contact = contact
        self.sender = sender
        self.trust = trust
        self.in_thread = in_thread
        self.reactor = reactor or clock  # for HTTPS; ``clock`` says which day it is
        self._running: defer.Deferred | None = None

    def run(self) -> defer.Deferred:
        if self._running is None:
            self._running = defer.ensureDeferred(self._run())
            self._running.addErrback(lambda f: log.failure("TLS reports failed", f))
            self._running.addBoth(self._ran)
        return self._running

    def _ran(self, _) -> None:
        self._running = None

    async def _run(self) -> None:
        today = day_of(self.clock.seconds())
        days = await self.in_thread(self._due, today)
        for day in days:
            entries = await self.in_thread(self._read, day)
            for domain, policies in sorted(aggregate(entries).items()):
                await self._send(day, domain, policies)
            await self.in_thread(self._done, day)

    def _due(self, today: str) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[:-6] for n in names if n.endswith(".jsonl") and n[:-6] < today)

    def _read(self, day: str) -> list[dict]:
        entries = []
        with open(os.path.join(self.directory, f"{day}.jsonl")) as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except ValueError:  # a line cut short by a crash
                    continue
        return entries

    def _done(self, day: str) -> None:
        path = os.path.join(self.directory, f"{day}.jsonl")
        os.rename(path, path + ".sent")

    async def _send(self, day: str, domain: str, policies: list[dict]) -> None:
        try:
            answer = await self.lookup.lookup(f"_smtp._tls.{domain}", "TXT")
            uris = parse_rua(answer.records)
        except NoSuchName:
            uris = []
        except LookupFailure as e:
            log.warn("TLS report of {day} for {domain} not sent: _smtp._tls lookup failed "
                     "({e})", day=day, domain=domain, e=str(e) or type(e).__name__)
            return
        if not uris:
            return
        rep = report(day, policies, self.organization, self.contact)
        for uri in uris:
            try:
                if uri.startswith("mailto:"):
                    to = uri[7:].split("?", 1)[0]
                    envelope = Envelope(id="", sender="", recipients=[to], user=None,
                                        account=None, client_ip=None, helo=None, tls=False,
                                        received_at=self.clock.seconds())
                    data = message(rep, domain, to, self.organization, self.sender,
                                   self.clock.seconds())
                    queue_id = await defer.maybeDeferred(self.submit, envelope, data)
                    log.info("TLS report of {day} for {domain} queued for <{to}>: {id}",
                             day=day, domain=domain, to=to, id=queue_id)
                else:
                    await self._post(uri, rep)
                    log.info("TLS report of {day} for {domain} posted to {uri}", day=day,
                             domain=domain, uri=uri)
            except Exception as e:
                log.warn("TLS report of {day} for {domain} to {uri} not sent: {e}",
                         day=day, domain=domain, uri=uri, e=str(e) or type(e).__name__)

    async def _post(self, uri: str, rep: dict) -> None:
        from io import BytesIO

        agent = Agent(self.reactor, BrowserLikePolicyForHTTPS(self.trust))
        body = FileBodyProducer(BytesIO(gzip.compress(json.dumps(rep).encode())))
        response = await agent.request(
            b"POST", uri.encode("ascii"),
            Headers({b"Content-Type": [b"application/tlsrpt+gzip"]}), body)
        if not 200 <= response.code < 300:
            raise OSError(f"HTTP {response.code}")


class TlsReportService(Service):
    """Runs ``reporter`` at startup and every CHECK seconds; writes the counts at stop."""

    def __init__(self, counter: Counter, reporter: Reporter) -> None:
        self.counter = counter
        self.reporter = reporter
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.reporter.run)
        self._loop.clock = self.reporter.clock
        self._loop.start(CHECK, now=True).addErrback(
            lambda f: log.failure("TLS reports stopped", f))

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.counter.flush()
