"""The log file's text: the same lines as Twisted's classic format, made faster, and the
observer the plugin hands to twistd."""

from __future__ import annotations

import datetime
import io
import json
import signal

import pytest
from twisted.application.service import Application
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from mailrelay import logtext, tuning
from mailrelay.logtext import (
    MAX_GATHERED,
    GatheringObserver,
    classic_text,
    event_json,
    json_line,
    json_observer,
    quietly,
    twistd_observer,
)
from tests.harness import Relay, wait_for

NOW = 1795539151.083215


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")

    __repr__ = __str__


class Point:
    x = 3


def events() -> list[dict]:
    base = dict(log_time=NOW, log_namespace="mailrelay.smtp.server", log_level=LogLevel.info)
    try:
        raise ValueError("for the traceback")
    except ValueError:
        failure = Failure()
    return [
        {**base, "log_format": "session {session}: {ip} tls={tls}", "session": 7,
         "ip": "192.0.2.7", "tls": False},
        {**base, "log_format": "{a!r:>12}|{b:08.3f}|{c!s}|{d!a}", "a": "x", "b": 3.14159,
         "c": None, "d": "é"},
        {**base, "log_format": "{p.x} {m[k]} {l[1]}", "p": Point(), "m": {"k": "v"},
         "l": [1, 2]},
        {**base, "log_format": "called {f()}", "f": lambda: "yes"},
        {**base, "log_format": "missing {nothing}"},
        {**base, "log_format": "positional {}"},
        {**base, "log_format": "bad {value}", "value": Unprintable()},
        {**base, "log_format": b"bytes {x}", "x": 1},
        {**base, "log_format": None},
        {**base},
        {**base, "log_format": ""},
        {**base, "log_format": "{empty}", "empty": ""},
        {**base, "log_format": "two\nlines {x}\n", "x": "and\nmore"},
        {**base, "log_format": "{{braces}} {x}", "x": "{y}"},
        {**base, "log_format": "system", "log_system": "my-system"},
        {**base, "log_format": "object system", "log_system": 42},
        {**base, "log_format": "bad system", "log_system": Unprintable()},
        {"log_format": "no namespace, level or time"},
        {**base, "log_format": "no time", "log_time": None},
        {**base, "log_format": "late in a second", "log_time": 1795539151.99999},
        {**base, "log_format": "rounds up", "log_time": 1795539151.9999997},
        {**base, "log_format": "next second", "log_time": 1795539152.0},
        {**base, "log_format": "warned", "log_level": LogLevel.warn},
        {**base, "log_format": "failed {why}", "why": "badly", "log_failure": failure},
        {**base, "log_format": "failed quietly", "log_failure": failure,
         "log_level": LogLevel.critical},
    ]


@pytest.mark.parametrize("event", events(), ids=lambda e: repr(e.get("log_format"))[:30])
def test_the_same_line_as_twisted(event):
    assert classic_text(dict(event)) == formatEventAsClassicLogText(dict(event))


@pytest.mark.parametrize("event", events()[:3] + events()[12:14],
                         ids=lambda e: repr(e.get("log_format"))[:30])
def test_events_from_the_delivery_process_read_as_twisted_reads_them(event):
    """The delivery process's events arrive as JSON, flattened."""
    received = eventFromJSON(eventAsJSON(dict(event)))
    assert "log_flattened" in received
    assert classic_text(received) == formatEventAsClassicLogText(received)


def twisted_carries(event: dict) -> bool:
    """Whether Twisted's own records carry the event faithfully: its flattening cannot
    convert with !a, and raises for a field it cannot find or print."""
    fmt = event.get("log_format")
    return isinstance(fmt, str) and "!a" not in fmt and fmt not in (
        "missing {nothing}", "positional {}", "bad {value}") and "bad system" not in fmt


@pytest.mark.parametrize("event", [e for e in events() if twisted_carries(e)],
                         ids=lambda e: repr(e.get("log_format"))[:30])
def test_the_delivery_process_records_read_into_the_lines_twisted_records_make(event):
    """The relay writes the same line from the delivery process's record as from
    Twisted's own record of the event (eventAsJSON)."""
    event = {**event, "log_logger": Logger(), "log_source": Point()}
    ours = eventFromJSON(event_json(event))
    theirs = eventFromJSON(eventAsJSON(dict(event)))
    assert classic_text(ours) == formatEventAsClassicLogText(theirs)


def test_records_twisted_cannot_make_still_reach_the_log():
    converted, missing = events()[1], events()[4]
    assert classic_text(eventFromJSON(event_json(converted))).endswith(
        "         'x'|0003.142|None|'\\xe9'\n")
    with pytest.raises(KeyError):
        eventAsJSON(dict(missing))
    assert "Unable to format event" in classic_text(eventFromJSON(event_json(missing)))


def test_records_of_plain_values_are_not_flattened_and_others_are_twisteds():
    plain = events()[0]
    record = eventFromJSON(event_json(plain))
    assert "log_flattened" not in record
    assert record["log_level"] is LogLevel.info and record["session"] == 7
    for other in (events()[2], events()[3], events()[-1], {**plain, "data": b"bytes"}):
        assert json.loads(event_json(other)) == json.loads(eventAsJSON(dict(other)))


def test_json_observer_writes_records_as_jsonFileLogObserver_does():
    out = io.StringIO()
    json_observer(out)(events()[0])
    text = out.getvalue()
    assert text.startswith("\x1e") and text.endswith("\n") and text.count("\n") == 1
    assert eventFromJSON(text[1:])["ip"] == "192.0.2.7"


@pytest.mark.parametrize("event", events(), ids=lambda e: repr(e.get("log_format"))[:30])
def test_a_json_line_says_what_the_text_line_says(event):
    """``[server] log_format = json``: one object per line, its text the text line's
    message, its time that line's, its fields the event's own."""
    line, text_line = json_line(dict(event)), formatEventAsClassicLogText(dict(event))
    if text_line is None:
        assert line is None
        return
    assert line.endswith("\n") and "\n" not in line[:-1]
    record = json.loads(line)
    stamp, rest = text_line.split(" [", 1)
    message = rest.split("] ", 1)[1]
    assert message.startswith(record["text"].replace("\n", "\n\t"))
    assert record["text"] == formatEvent(dict(event))
    if event.get("log_time") is None:
        assert record["time"] is None and stamp == "-"
    else:
        when = datetime.datetime.fromisoformat(record["time"])
        assert when.tzinfo == datetime.UTC and when.timestamp() == pytest.approx(
            event["log_time"], abs=1e-6)
        assert formatTime(when.timestamp()) == stamp
    level = event.get("log_level")
    assert record["level"] == (level.name if level else None)
    if "log_failure" in event:
        assert record["traceback"].startswith("Traceback") and "for the traceback" in (
            record["traceback"])
    for key, value in event.items():
        if not key.startswith("log_") and type(value) in (str, int, float, bool, type(None)):
            assert record[key] == value


def test_a_json_line_keeps_its_own_keys_and_the_events_fields_beside_them():
    event = {"log_namespace": "mailrelay.delivery.manager", "log_level": LogLevel.info,
             "log_time": NOW, "queue_id": "31a20d4103c920859b", "recipient": "bob@example.net",
             "log_format": "{queue_id} to=<{recipient}> sent: {code} {text} tls={tls}",
             "code": 250, "text": "2.0.0 Ok", "tls": "yes", "level": "x", "ratio": float("nan")}
    record = json.loads(json_line(event))
    assert record == {
        "time": "2026-11-24T16:52:31.083215Z", "level": "info",
        "system": "mailrelay.delivery.manager",
        "text": "31a20d4103c920859b to=<bob@example.net> sent: 250 2.0.0 Ok tls=yes",
        "queue_id": "31a20d4103c920859b", "recipient": "bob@example.net", "code": 250,
        "event_text": "2.0.0 Ok", "tls": "yes", "event_level": "x", "ratio": "nan"}
    legacy = {"log_time": NOW, "log_level": LogLevel.info, "log_system": "-",
              "log_format": "{log_text}", "log_text": "SubmissionFactory starting on 587",
              "message": ("SubmissionFactory starting on 587",), "isError": 0, "system": "-",
              "time": NOW, "format": None}
    assert json.loads(json_line(legacy)) == {
        "time": "2026-11-24T16:52:31.083215Z", "level": "info", "system": "-",
        "text": "SubmissionFactory starting on 587"}


def test_the_plugin_writes_json_lines_for_log_format_json(tmp_path, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    observer = twistd_observer(options("-n"), "json")
    observer(events()[0])
    assert json.loads(out.getvalue())["session"] == 7


def test_lines_of_one_second_share_a_stamp_and_the_next_second_gets_its_own():
    first = classic_text({"log_format": "a", "log_time": NOW})
    same = classic_text({"log_format": "b", "log_time": NOW + 0.5})
    later = classic_text({"log_format": "c", "log_time": NOW + 1.2})
    assert first[:24] == same[:24] != later[:24]
    assert later == formatEventAsClassicLogText({"log_format": "c", "log_time": NOW + 1.2})
    # a stamp made before is not reused for an earlier time
    assert classic_text({"log_format": "a", "log_time": NOW}) == first


def options(*argv: str) -> ServerOptions:
    parsed = ServerOptions()
    parsed.parseOptions([*argv, "mailrelay"])
    return parsed


def test_twistd_observer_writes_the_file_twistd_would(tmp_path, monkeypatch):
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN)  # keep the test's
    path = tmp_path / "relay.log"
    observer = twistd_observer(options("-n", f"--logfile={path}"))
    assert isinstance(observer.out, LogFile)
    observer({"log_format": "hello {who}", "who": "sysadmin", "log_time": NOW,
              "log_namespace": "test", "log_level": LogLevel.info})
    observer.out.close()
    assert path.read_text().endswith("[test#info] hello sysadmin\n")


def test_twistd_observer_in_the_foreground_without_logfile_writes_stdout(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    observer = twistd_observer(options("-n"))
    observer({"log_format": "to stdout", "log_time": NOW})
    assert out.getvalue().endswith("[-#-] to stdout\n")
    assert twistd_observer(options("-n", "--logfile=-")).out is out


def test_twistd_keeps_its_own_choice_for_syslog_loggers_and_daemons_on_stdout():
    assert twistd_observer(options("--syslog")) is None
    assert twistd_observer(options("-n", "--logger=twisted.logger.textFileLogObserver")) is None
    assert twistd_observer(options("--logfile=-")) is None  # twistd refuses, with its message


def test_the_plugin_gives_the_application_its_observer(tmp_path, monkeypatch):
    from twisted.plugins.mailrelay_plugin import service_maker

    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN)
    config = tmp_path / "mailrelay.ini"
    config.write_text(f"[server]\ndata_dir = {tmp_path / 'data'}\n[admin]\nenabled = no\n"
                      "[listener:smtp]\nendpoint = tcp:0:interface=127.0.0.1\ntls = none\n"
                      "[policy]\nip_auth = 127.0.0.1/32 = ip@doe.test\n")
    parsed = options("-n", f"--logfile={tmp_path / 'relay.log'}")
    sub = parsed.subOptions
    sub.parseOptions(["--config", str(config)])
    application = Application("mailrelay")
    before = set(reactor.getDelayedCalls())
    try:
        service_maker.makeService(sub).setServiceParent(application)
    finally:
        for call in set(reactor.getDelayedCalls()) - before:
            call.cancel()  # the DNS resolver's re-reading of resolv.conf
    observer = application.getComponent(ILogObserver)
    # Twisted's own formatting when MAILRELAY_STOCK turns log_text off (tuning.py).
    assert observer.format_event is (classic_text if tuning.on("log_text")
                                     else formatEventAsClassicLogText)
    observer.out.close()


def test_a_running_relay_logs_through_it_and_sigusr1_still_rotates_the_log(tmp_path):
    relay = Relay(tmp_path / "relay")
    relay.start()
    try:
        wait_for(lambda: "starting on" in relay.log(), what="the startup lines")
        relay.process.send_signal(signal.SIGUSR1)
        rotated = relay.log_path.with_name(relay.log_path.name + ".1")
        wait_for(rotated.exists, what="the rotated log")
        with relay.smtp(starttls=False) as client:
            client.noop()
        wait_for(lambda: "connection from 127.0.0.1" in relay.log(),
                 what="the session's line in the new log")
        assert "starting on" in rotated.read_text() and "starting on" not in relay.log()
    finally:
        relay.stop()


class Writes:
    """A text file that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def line(text: str, level: LogLevel = LogLevel.info) -> dict:
    return {"log_format": text, "log_level": level, "log_time": NOW}


class GatheringTests(unittest.TestCase):
    """While the reactor runs, lines are written together; warnings and a stop at once."""

    def setUp(self) -> None:
        self.out = Writes()
        self.observer = GatheringObserver(self.out, lambda e: e["log_format"] + "\n",
                                          delay=0.05)

    def later(self, seconds: float, f):
        return deferLater(reactor, seconds, f)

    def test_lines_while_running_leave_in_one_write_after_the_delay(self):
        def log() -> None:
            for text in ("a", "b", "c"):
                self.observer(line(text))
            self.assertEqual(self.out.writes, [])  # none written at once

        def check(_) -> None:
            self.assertEqual(self.out.writes, ["a\nb\nc\n"])

        return self.later(0, log).addCallback(lambda _: self.later(0.3, lambda: None)
                                              ).addCallback(check)

    def test_a_warning_goes_at_once_with_the_lines_before_it(self):
        def log() -> None:
            self.observer(line("first"))
            self.observer(line("trouble", LogLevel.warn))
            self.assertEqual(self.out.writes, ["first\ntrouble\n"])
            self.observer(line("failed", LogLevel.error))
            self.observer({**line("crash", LogLevel.info), "log_failure": object()})
            self.assertEqual(self.out.writes[1:], ["failed\n", "crash\n"])

        # and the timer the first line set finds nothing left to write
        return self.later(0, log).addCallback(lambda _: self.later(0.2, lambda: None)
                                              ).addCallback(
            lambda _: self.assertEqual(len(self.out.writes), 3))

    def test_a_burst_over_the_limit_is_written_without_waiting(self):
        big = "x" * (MAX_GATHERED // 4)

        def log() -> None:
            for _ in range(4):
                self.observer(line(big))
            self.assertEqual(len(self.out.writes), 1)
            self.assertEqual(len(self.out.writes[0]), 4 * (len(big) + 1))

        # the timer the first line set finds nothing left to write
        return self.later(0, log).addCallback(lambda _: self.later(0.2, lambda: None)
                                              ).addCallback(
            lambda _: self.assertEqual(len(self.out.writes), 1))

    def test_a_failed_write_is_tried_again_without_waiting_for_another_line(self):
        self.patch(logtext, "RETRY_DELAY", 0.1)
        out = FailingFile()
        observer = GatheringObserver(out, lambda e: formatEvent(e) + "\n", delay=0.05)

        def recover(_) -> None:
            self.assertEqual(out.writes, [])  # the gathered write failed
            out.failing = False

        def check(_) -> None:
            self.assertEqual(out.writes[0], "a\nb\n")
            self.assertIn("2 lines were written late, 0 lost", out.writes[1])

        d = self.later(0, lambda: (observer(line("a")), observer(line("b"))))
        d.addCallback(lambda _: self.later(0.08, lambda: None)).addCallback(recover)
        return d.addCallback(lambda _: self.later(0.3, lambda: None)).addCallback(check)

    def test_without_a_running_reactor_every_line_goes_at_once(self):
        # a test's own body runs before trial starts the reactor: as at startup and
        # after a stop, nothing would be left to write the lines later
        self.assertFalse(reactor.running)
        self.observer(line("config error"))
        self.assertEqual(self.out.writes, ["config error\n"])


def info(text: str, **fields) -> dict:
    return {"log_format": text, "log_level": LogLevel.info, "log_time": NOW,
            "log_namespace": "mailrelay.smtp.server", **fields}


def test_a_line_utf8_cannot_hold_is_escaped_and_no_line_around_it_is_lost(tmp_path):
    # a From: address read with "surrogateescape" once made LogFile's encode raise,
    # and the lines gathered with it were gone
    log_file = LogFile.fromFullPath(str(tmp_path / "relay.log"))
    observer = GatheringObserver(log_file, classic_text)
    observer(info("accepted {id}: session=1", id="A1"))
    observer(info("refused From: header address {a}", a="x@ev\udcffil.example"))
    observer(info("login failed: ip={ip} user=doe.com", ip="203.0.113.9"))
    log_file.close()
    text = (tmp_path / "relay.log").read_bytes().decode("utf-8")  # strictly UTF-8
    assert "accepted A1: session=1\n" in text
    assert "refused From: header address x@ev\\udcffil.example\n" in text
    assert "login failed: ip=203.0.113.9 user=doe.com\n" in text


class FailingFile(Writes):
    """A log file whose writes fail (a full disk) until ``failing`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    def write(self, text: str) -> None:
        if self.failing:
            raise OSError(28, "No space left on device")
        super().write(text)


def test_lines_a_write_could_not_take_are_kept_and_the_failure_reported(capfd):
    out = FailingFile()
    observer = GatheringObserver(out, classic_text)
    for i in range(3):
        observer(info("line {i}", i=i))  # each write fails: nothing raised, nothing lost
    assert out.writes == []
    assert "cannot write the log (OSError: [Errno 28] No space left on device)" in (
        capfd.readouterr().err)  # the process's own stderr: twistd's goes to the log
    out.failing = False
    observer(info("line {i}", i=3))
    text = "".join(out.writes)
    assert [ln.split("] ", 1)[1] for ln in text.splitlines()[:4]] == [
        "line 0", "line 1", "line 2", "line 3"]
    assert text.splitlines()[4].endswith(
        "the log could not be written for 0 s (OSError: [Errno 28] No space left on "
        "device); 3 lines were written late, 0 lost")
    assert "[mailrelay.logtext#error]" in text.splitlines()[4]
    observer(info("line {i}", i=4))
    assert out.writes[-1].endswith("] line 4\n")  # and no note again


def test_while_the_log_cannot_be_written_the_newest_lines_are_kept(monkeypatch, capfd):
    monkeypatch.setattr(logtext, "MAX_HELD", 100)
    out = FailingFile()
    observer = GatheringObserver(out, lambda e: formatEvent(e) + "\n")
    for i in range(30):
        observer(line(f"line {i:02}"))  # 8 characters each
    out.failing = False
    observer(line("back"))
    written = "".join(out.writes).splitlines()
    assert written[0] == "line 18" and written[12] == "back"  # the newest 100 characters
    assert written[13].endswith("12 lines were written late, 18 lost")


def test_a_stream_that_cannot_encode_a_line_gets_it_escaped():
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    observer = GatheringObserver(out, lambda e: e["log_format"] + "\n")
    observer(line("caf\u00e9"))
    observer(line("after"))
    out.flush()
    assert out.buffer.getvalue() == b"caf\\xe9\nafter\n"


def test_twisteds_lines_about_its_internal_connections_are_left_out():
    out = Writes()
    observer = GatheringObserver(out, classic_text)
    twisted_log = Logger(namespace="twisted.protocols.amp", observer=observer)
    twisted_log.info("{cls} connection established (HOST:{host} PEER:{peer})",
                     cls="RelayChannel", host="h", peer="p")
    twisted_log.warn("a problem worth a line")
    from twisted.python import log as legacy

    legacy.addObserver(observer)  # legacy log.msg, as twisted.internet.udp writes
    try:
        quietly(legacy.msg, "DNSDatagramProtocol starting on 47584")
        legacy.msg("a line of its own")
    finally:
        legacy.removeObserver(observer)
    text = "".join(out.writes)
    assert "connection established" not in text and "starting on" not in text
    assert "a problem worth a line" in text and "a line of its own" in text
