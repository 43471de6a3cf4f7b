"""The pieces that wire the features into the relay: envelope fields, copies read like
files, the [features]/[tracking] settings, the policy layer and archive pruning."""

from __future__ import annotations

import email
import io
import os
import time
from email.policy import default

import mime_samples as s
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailrelay.config import ConfigError, load_config
from mailrelay.features.archive import DAY, Archive, ArchivePruner
from mailrelay.features.batch import Coalescing
from mailrelay.features.copy import Copy, PiecesReader
from mailrelay.features.envelope import bounce_to, user_fields
from mailrelay.features.links import Links, Recipient
from mailrelay.features.paths import feature_paths
from mailrelay.features.personalize import Options, Personalizer
from mailrelay.features.policy import FeaturePolicy
from mailrelay.features.tokens import TokenSigner
from mailrelay.interfaces import ISessionPolicy, ISubmissionPolicy
from mailrelay.model import SmtpUser

# ---- envelope fields ----


def test_user_without_features_gets_a_plain_envelope():
    fields = user_fields(SmtpUser("app"), ["a@x.test"])
    assert fields == {"recipients": ["a@x.test"], "audit": [], "bounce_to": None,
                      "personalize": []}  # fmt: skip


def test_audit_bcc_added_once_and_remembered():
    user = SmtpUser("app", audit_bcc=("audit@corp.test", "a@x.test", "audit@corp.test"),
                    unsubscribe_footer=True, click_tracking=True)  # fmt: skip
    fields = user_fields(user, ["a@x.test", "b@x.test"])
    assert fields["recipients"] == ["a@x.test", "b@x.test", "audit@corp.test"]
    assert fields["audit"] == ["audit@corp.test"]  # a@x.test is a recipient anyway
    assert fields["personalize"] == ["footer", "clicks"]


@pytest.mark.parametrize("setting,expected", [
    ("sender", None), ("off", ""), ("OFF", ""), ("ops@corp.test", "ops@corp.test"),
    ("", None), ("not an address", None),
])  # fmt: skip
def test_bounce_to(setting, expected):
    assert bounce_to(setting) == expected


# ---- copies ----


def test_pieces_reader_reads_seeks_and_sizes():
    data = b"".join(bytes([i]) * (i + 1) for i in range(40))
    pieces = [data[:3], memoryview(data)[3:3], memoryview(data)[3:500], data[500:]]
    f = PiecesReader(pieces)
    assert f.seek(0, os.SEEK_END) == len(data) and f.tell() == len(data)
    f.seek(0)
    chunks = []
    while chunk := f.read(7):
        chunks.append(chunk)
    assert b"".join(chunks) == data
    for pos in (0, 2, 3, 4, 499, 500, len(data) - 1, len(data) + 10):
        f.seek(pos)
        assert f.read() == data[pos:]
    f.close()
    assert f.closed


def test_copy_shares_the_original_bytes():
    links = Links(TokenSigner(b"k" * 32), "https://track.example")
    personalizer = Personalizer(links)
    raw = s.mixed_with_attachments()
    parsed = personalizer.prepare(raw)
    r = Recipient("30193a2b4c5d6e7f8a9b", "acme", "news@acme.example", "alice@example.org")
    options = Options(footer=True, opens=True)
    copy = personalizer.copy(parsed, r, options)
    assert copy.changed
    owned = sum(len(p) for p in copy.pieces if not isinstance(p, memoryview))
    assert owned < len(raw) / 4  # the attachment is not copied
    assert copy.to_bytes() == personalizer.for_recipient(parsed, r, options).data
    msg = email.message_from_bytes(copy.open().read(), policy=default)
    assert "alice@example.org" in msg.get_body(("plain",)).get_content()
    unchanged = Copy([raw], False)
    assert unchanged.size == len(raw) and unchanged.open().read() == raw


# ---- settings ----


def write(tmp_path, text: str) -> str:
    path = tmp_path / "relay.ini"
    path.write_text(f"[server]\nhostname = relay.test\ndata_dir = {tmp_path}/data\n{text}")
    return str(path)


def test_feature_settings_and_paths(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.tracking.enabled is False
    assert config.tracking.base_url == "http://relay.test:8081"
    assert config.features.archive_retention == 90 * DAY
    paths = feature_paths(config)
    assert paths.token_key == f"{tmp_path}/data/tracking.key"
    assert paths.stats_db == f"{tmp_path}/data/stats.sqlite"
    config = load_config(write(tmp_path, (
        "[tracking]\nenabled = yes\nendpoint = tcp:9999:interface=127.0.0.1\n"
        f"key_file = {tmp_path}/k\n[features]\nstats_db = {tmp_path}/s.sqlite\n")))  # fmt: skip
    assert config.tracking.base_url == "http://relay.test:9999"
    assert feature_paths(config).token_key == f"{tmp_path}/k"
    assert feature_paths(config).stats_db == f"{tmp_path}/s.sqlite"
    config = load_config(write(tmp_path, "[tracking]\nbase_url = https://t.example/mr/\n"))
    assert config.tracking.base_url == "https://t.example/mr"


@pytest.mark.parametrize("text,where", [
    ("[tracking]\nbase_url = ftp://t.example\n", "[tracking] base_url"),
    ("[tracking]\nbase_url = https://t.example/?a=1\n", "[tracking] base_url"),
    ("[tracking]\nunsubscribe_mailto = nobody\n", "[tracking] unsubscribe_mailto"),
    ("[tracking]\nenabled = yes\nendpoint = nonsense:1\n", "[tracking] endpoint"),
    ("[features]\nfooter_text = x\nfooter_text_file = /f\n", "[features] footer_text_file"),
    ("[features]\narchive_retention = forever\n", "[features] archive_retention"),
])  # fmt: skip
def test_bad_feature_settings(tmp_path, text, where):
    with pytest.raises(ConfigError, match=f"{where}".replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text))


# ---- the policy layer ----


class Recorded:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


class Avatar:
    user = SmtpUser("app", archive=True)


def test_feature_policy_adds_the_hooks_and_keeps_the_rest():
    inner_session, features = Recorded(), Recorded()

    class Inner:
        def connect(self, client_ip):
            return inner_session

    class Spool:
        def open_body(self, queue_id):
            return io.BytesIO(b"body of " + queue_id.encode())

    policy = FeaturePolicy(Inner(), features, Spool())
    assert verifyObject(ISubmissionPolicy, policy)
    session = policy.connect("192.0.2.1")
    assert ISessionPolicy.providedBy(session)
    envelope = type("E", (), {"id": "q1"})()
    session.mailFrom(Avatar, "a@x.test")
    session.senderRefused(Avatar, "evil@y.test", True)
    session.accepted(Avatar, envelope)
    assert [c[0] for c in inner_session.calls] == ["mailFrom", "senderRefused", "accepted"]
    (rejected, accepted) = features.calls
    assert rejected == ("rejected", Avatar.user)
    assert accepted[:3] == ("accepted", envelope, Avatar.user)
    assert accepted[3]().read() == b"body of q1"


def test_feature_policy_with_a_deferred_connect():
    inner_session = Recorded()

    class Inner:
        def connect(self, client_ip):
            return defer.succeed(inner_session)

    got = []
    FeaturePolicy(Inner(), Recorded(), None).connect("192.0.2.1").addCallback(got.append)
    assert ISessionPolicy.providedBy(got[0])


# ---- archive pruning ----


class InlineThreads(Clock):
    """A Clock whose thread pool runs work at once (deterministic pruning tests)."""

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            on_result(True, f(*args, **kwargs))
        except Exception:
            from twisted.python.failure import Failure

            on_result(False, Failure())

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def test_archive_pruned_at_start_then_daily(tmp_path):
    clock = InlineThreads()
    clock.advance(time.time())
    archive = Archive(str(tmp_path / "archive"), retention_days=2)
    archive.store("app", "q1", b"Subject: old\r\n\r\nx\r\n", "a@x.test", ["b@y.test"],
                  when=clock.seconds() - 3 * DAY)  # fmt: skip
    archive.store("app", "q2", b"Subject: new\r\n\r\nx\r\n", "a@x.test", ["b@y.test"],
                  when=clock.seconds() - DAY)  # fmt: skip
    pruner = ArchivePruner(archive, clock)
    pruner.startService()
    assert [e.subject for e in archive.list("app")] == ["new"]
    clock.advance(DAY + 1)
    assert archive.list("app") == []
    pruner.stopService()
    assert not clock.getDelayedCalls()


# ---- coalesced lookups ----


def held_pool():
    """A thread pool whose hops the test fires: (hops, their jobs, in_thread)."""
    hops: list[defer.Deferred] = []
    jobs = []

    def in_thread(g):
        d = defer.Deferred()
        hops.append(d)
        jobs.append(g)
        return d

    return hops, jobs, in_thread


def test_calls_made_while_one_runs_share_the_next_thread_hop():
    hops, jobs, in_thread = held_pool()

    def lookup(x):
        if x == "bad":
            raise ValueError(x)
        return x.upper()

    call = Coalescing(lookup, in_thread)
    results = []
    call("a").addCallback(results.append)
    call("b").addCallback(results.append)
    bad = call("bad")
    bad.addErrback(lambda f: results.append(f.type))
    call("c").addCallback(results.append)
    assert len(hops) == 1  # "a" went at once; the rest wait for it
    hops[0].callback(jobs[0]())
    assert results == ["A"] and len(hops) == 2  # then all three in one hop
    hops[1].callback(jobs[1]())
    assert results == ["A", "B", ValueError, "C"] and len(hops) == 2
    failures = []
    call("d").addErrback(failures.append)  # idle again: at once
    assert len(hops) == 3
    hops[2].errback(RuntimeError("pool stopped"))
    assert [f.type for f in failures] == [RuntimeError]


def test_coalescing_many_makes_one_call_per_burst_and_fails_it_whole():
    hops, jobs, in_thread = held_pool()

    def write(batch):  # one transaction for every waiting call
        if ("bad",) in batch:
            raise ValueError("refused")
        return [x.upper() for (x,) in batch]

    call = Coalescing(write, in_thread, many=True)
    results = []
    call("a").addCallback(results.append)
    call("b").addCallback(results.append)
    call("c").addCallback(results.append)
    hops[0].callback(jobs[0]())
    hops[1].callback(jobs[1]())
    assert results == ["A", "B", "C"] and len(hops) == 2
    def note(d):
        d.addCallbacks(results.append, lambda f: results.append(f.type))

    note(call("d"))
    note(call("bad"))
    note(call("e"))
    hops[2].callback(jobs[2]())  # "d" alone
    assert results[-1] == "D"
    hops[3].callback(jobs[3]())  # "bad" and "e" together: both fail
    assert results[-2:] == [ValueError, ValueError]
