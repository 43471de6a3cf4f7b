"""The log: twistd's file and the delivery process's records, the same text for less CPU.

twistd's file observer formats every event with ``string.Formatter`` in Python and works
out the time zone and ``strftime`` for every line; with three lines per session that was
about a fifth of the relay's CPU per message. ``classic_text`` makes exactly the text of
``twisted.logger.formatEventAsClassicLogText`` (checked line for line in the tests): a
plain ``log_format`` is formatted by ``str.format_map`` and the time stamp is made once a
second. Twisted's own formatting is left for the rest (its ``{f()}`` calls, the flattened
events of the delivery process, a format that does not fit its event), and its whole line
for events with a traceback.

The delivery process sends its events to the relay as Twisted's JSON records
(``event_json``), which the relay reads with ``eventFromJSON``. Twisted's ``eventAsJSON``
also flattens every event (each field formatted ahead, for values JSON cannot carry): for
events of plain values (text, numbers, booleans, None) that is left out, as the relay can
format those from the values themselves, to the same line.

Both write through ``GatheringObserver``: while the reactor runs, lines are gathered and
written together at most ``FLUSH_DELAY`` later, one ``write`` for many lines instead of
one each (a busy relay logs thousands a second, and each record of the delivery process
also woke the relay). A warning or worse goes at once, with every line before it, so the
lines that explain a failure are on disk when it happens; a stop writes everything.

No line is lost to what it says, nor to a write that fails. A line that UTF-8 cannot hold
(a lone surrogate) is written with that character escaped (``\\udcff``). Lines a write
could not take (a full disk, a file that cannot be reopened) are kept, up to
``MAX_HELD`` characters (beyond that the oldest go, and are counted), and written with
the next write (a stream that took part of a failed write may so repeat a few lines).
The first failure is said on the process's standard error at once; once the log can be
written again, an error line in it says for how long it could not and how many lines
were written late or lost.

Twisted's own lines about the connections of its internals (the UDP port of each DNS
query, the delivery process's AMP channel) say nothing a sysadmin can use, and some
carry a memory address: they are left out (``quietly``, ``_chatter``).

Both shortcuts rely on Twisted's exact line and record formats: ``MAILRELAY_STOCK`` turns
them off (``log_text`` in mailrelay/tuning.py) for Twisted's own formatting, the same
lines at about four times the CPU.

With ``[server] log_format = json`` the same events become one JSON object per line
(``json_line``) for Loki or Elasticsearch: ``time`` (RFC 3339, UTC), ``level``,
``system``, ``text`` (the message of the text line) and the event's own fields of plain
values (``queue_id``, ``session``, ``recipient``, ...). The delivery process's records
are formatted by the relay, so its lines are JSON too.

The plugin hands twistd the observer as the application's ``ILogObserver``, on the same
file twistd would have chosen from its options (``--logfile``, stdout with ``-n``, a
``SIGUSR1`` that rotates the file); ``--syslog`` and ``--logger`` stay twistd's.
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import log as legacy_log
from twisted.python.logfile import LogFile
from zope.interface import implementer

from mailrelay import tuning

FLUSH_DELAY = 0.05  # seconds an info line may wait to be written with others
MAX_GATHERED = 64 * 1024  # characters: more are written at once
MAX_HELD = 4 * 2**20  # characters kept while the log cannot be written
RETRY_DELAY = 1.0  # seconds between tries to write a log that could not be written
_URGENT = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})
QUIET_SYSTEM = "mailrelay-quiet"  # the log_system of Twisted's lines ``quietly`` marks
_CHATTY_NAMESPACES = frozenset({"twisted.protocols.amp"})  # its info lines: connections

_stamp: list = [None, "-"]  # (second, its text): every line of that second shares it


def _time_text(when: float | None) -> str:
    if when is None:
        return "-"
    second = int(when)
    if when - second >= 0.999:  # datetime may round this up into the next second
        return formatTime(when)
    if _stamp[0] != second:
        _stamp[1] = formatTime(second)
        _stamp[0] = second
    return _stamp[1]


def classic_text(event: Mapping[str, Any]) -> str | None:
    """The line ``formatEventAsClassicLogText`` makes of ``event``, or None for no line."""
    if "log_failure" in event:
        return formatEventAsClassicLogText(event)  # with its traceback
    text = _message(event)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    else:
        system = _str(system)
    line = f"{_time_text(event.get('log_time'))} [{system}] {text}"
    if "\n" in line:
        line = line.replace("\n", "\n\t")
    return line + "\n"


def _str(value: Any) -> str:
    if type(value) is str:
        return value
    try:
        return str(value)
    except Exception:
        return "UNFORMATTABLE"


def _message(event: Mapping[str, Any]) -> str:
    """The text of ``event``, as ``formatEvent`` makes it."""
    fmt = event.get("log_format")
    if type(fmt) is str and "()" not in fmt and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(event)  # Twisted's own, including what it cannot format


_PLAIN = frozenset((str, int, float, bool, type(None)))
# The keys of a JSON line; an event's field of the same name is written as "event_NAME".
_JSON_KEYS = ("time", "level", "system", "text")
# Fields of Twisted's legacy log events (log.msg), said again by the keys above.
_LEGACY = frozenset({"message", "isError", "system", "time", "format", "failure",
                     "printed"})


def json_line(event: Mapping[str, Any]) -> str | None:
    """One JSON object for ``event`` (``[server] log_format = json``): time (RFC 3339,
    UTC), level, system (the namespace, or a legacy event's system), text (the message of
    the text line) and the event's own fields of plain values (``queue_id``, ``session``,
    ``client_ip``, ...); a failure's traceback as ``traceback``. None for no line."""
    text = _message(event) if tuning.on("log_text") else formatEvent(event)
    failure = event.get("log_failure")
    if not text and failure is None:
        return None
    when, level, system = event.get("log_time"), event.get("log_level"), event.get("log_system")
    record: dict[str, Any] = {
        "time": None if when is None else _rfc3339(when),
        "level": None if level is None else level.name,
        "system": _str(event.get("log_namespace", "-") if system is None else system),
        "text": text,
    }
    for key, value in event.items():
        if type(value) in _PLAIN and key[:4] != "log_" and key not in _LEGACY:
            if type(value) is float and not math.isfinite(value):
                value = str(value)  # JSON has no NaN or infinity
            record[f"event_{key}" if key in _JSON_KEYS else key] = value
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = "(unformattable traceback)"
    return _JSON.encode(record) + "\n"


# Not ASCII-only: the gathering observer escapes what UTF-8 cannot hold, as it does for
# the text lines, and JSON escapes control characters and line ends. (json.dumps with
# options would make an encoder for every line.)
_JSON = json.JSONEncoder(ensure_ascii=False, default=str)
_second: list = [None, ""]  # (second, its text up to the seconds): shared within a second


def _rfc3339(when: float) -> str:
    """``when`` as datetime shows it (to the microsecond, rounded, maybe up into the next
    second, as the text line's time stamp is), the text up to the seconds made once a
    second."""
    second = math.floor(when)
    micro = round((when - second) * 1e6)
    if micro == 1_000_000:
        second, micro = second + 1, 0
    if _second[0] != second:
        stamp = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _second[1] = stamp.strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = second
    return f"{_second[1]}.{micro:06d}Z"


# Each level as eventAsJSON writes it (its class marker), for eventFromJSON to read back.
_LEVELS = {level: json.loads(eventAsJSON({"log_level": level}))["log_level"]
           for level in LogLevel.iterconstants()}


def event_json(event: Mapping[str, Any]) -> str:
    """A JSON record of ``event`` that ``eventFromJSON`` reads and ``classic_text`` turns
    into the line the event itself makes."""
    fmt = event.get("log_format")
    if type(fmt) is str and "()" not in fmt and "log_failure" not in event:
        record: dict[str, Any] = {}
        for key, value in event.items():
            if type(value) in _PLAIN:
                record[key] = value
            elif key == "log_level" and value in _LEVELS:
                record[key] = _LEVELS[value]
            elif not key.startswith("log_"):
                break  # a value only flattening can carry
            # other log_ keys (the Logger, its source object) mean nothing in the relay
        else:
            return json.dumps(record)
    return eventAsJSON(dict(event))


def quietly(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``f(*args, **kwargs)``, the lines Twisted's legacy ``log.msg`` makes meanwhile left
    out of the log (twisted.internet.udp writes a line as each port opens and closes,
    whatever its protocol's ``noisy`` says)."""
    return legacy_log.callWithContext({"system": QUIET_SYSTEM}, f, *args, **kwargs)


def _chatter(event: Mapping[str, Any]) -> bool:
    return (event.get("log_system") == QUIET_SYSTEM
            or (event.get("log_namespace") in _CHATTY_NAMESPACES
                and event.get("log_level") is LogLevel.info))


def _encodable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a lone surrogate (bytes decoded with
    "surrogateescape") as its escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _say(text: str) -> None:
    """A line on the process's own standard error (twistd's ``sys.stderr`` goes to the
    log), for when the log itself cannot be written."""
    try:
        sys.__stderr__.write(text + "\n")
        sys.__stderr__.flush()
    except Exception:
        pass  # nowhere left to say it


@implementer(ILogObserver)
class GatheringObserver:
    """Writes ``format_event(event)`` of each event to ``out``; while the reactor runs,
    gathered for up to ``delay`` seconds (see the module docstring). Thread-safe, as
    events may come from any thread."""

    def __init__(self, out: IO[str], format_event: Callable[[Mapping[str, Any]], str | None],
                 delay: float = FLUSH_DELAY) -> None:
        self.out = out
        self.format_event = format_event
        self._delay = delay
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._size = 0
        self._armed = False  # a flush is scheduled
        self._hooked = False  # the reactor's shutdown flushes
        # While writes fail: since when, the first error, the lines waiting, and dropped.
        self._failed_since: float | None = None
        self._error = ""
        self._late = 0
        self._lost = 0
        atexit.register(self.flush)

    def __call__(self, event: Mapping[str, Any]) -> None:
        if _chatter(event):
            return
        text = self.format_event(event)
        if not text:
            return
        if not text.isascii():
            text = _encodable(text)
        reactor = _running_reactor()
        urgent = (reactor is None or "log_failure" in event
                  or event.get("log_level") in _URGENT)
        with self._lock:
            self._lines.append(text)
            self._size += len(text)
            # While the log cannot be written, a full batch waits for the retry.
            if urgent or (self._size >= MAX_GATHERED and self._failed_since is None):
                self._write()
                return
            if self._armed:
                return
            self._armed = True
            hook, self._hooked = not self._hooked, True
        if hook:
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        reactor.callFromThread(reactor.callLater, self._delay, self.flush)

    def flush(self) -> None:
        """Write what is gathered now."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        """With the lock held. Lines are forgotten only once written."""
        self._armed = False
        if not self._lines:
            return
        text = "".join(self._lines)
        try:
            try:
                self.out.write(text)
            except UnicodeEncodeError:  # a stream whose encoding is not UTF-8
                self.out.write(text.encode("ascii", "backslashreplace").decode("ascii"))
            self.out.flush()
        except Exception as e:
            self._held_back(e)
            return
        self._lines.clear()
        self._size = 0
        if self._failed_since is not None:
            self._recovered()

    def _held_back(self, error: Exception) -> None:
        """The write failed: keep the lines (the newest MAX_HELD characters of them) and
        try again later."""
        if self._failed_since is None:
            self._failed_since = time.time()
            self._error = f"{type(error).__name__}: {error}"
            _say(f"mailrelay: cannot write the log ({self._error}); its lines are kept "
                 "and written once it can be")
        if self._size > MAX_HELD:
            cut, size = 0, self._size
            while size > MAX_HELD and cut < len(self._lines) - 1:
                size -= len(self._lines[cut])
                cut += 1
            del self._lines[:cut]
            self._size = size
            self._lost += cut
        self._late = len(self._lines)
        reactor = _running_reactor()
        if reactor is not None and not self._armed:
            self._armed = True
            reactor.callFromThread(reactor.callLater, RETRY_DELAY, self.flush)

    def _recovered(self) -> None:
        """Say in the log that it could not be written for a while."""
        now = time.time()
        text = self.format_event({
            "log_namespace": __name__, "log_level": LogLevel.error, "log_time": now,
            "log_format": "the log could not be written for {seconds:.0f} s ({error}); "
                          "{written} lines were written late, {lost} lost",
            "seconds": now - self._failed_since, "error": self._error,
            "written": self._late, "lost": self._lost,
        })
        self._failed_since, self._error, self._late, self._lost = None, "", 0, 0
        try:
            self.out.write(_encodable(text or ""))
            self.out.flush()
        except Exception as e:
            _say(f"mailrelay: cannot write the log ({type(e).__name__}: {e})")


def _running_reactor():
    """The reactor if it is installed and running: gathered lines are sure to be
    written by a timer or at shutdown only then (before it runs, and after it stopped,
    every line goes at once)."""
    reactor = sys.modules.get("twisted.internet.reactor")
    return reactor if getattr(reactor, "running", False) else None


def json_observer(out: IO[str]) -> GatheringObserver:
    """What ``jsonFileLogObserver`` writes (RS, a record, LF), made by ``event_json``."""
    record = event_json if tuning.on("log_text") else (lambda event: eventAsJSON(dict(event)))
    return GatheringObserver(out, lambda event: f"\x1e{record(event)}\n")


def _line_format(log_format: str = "text") -> Callable[[Mapping[str, Any]], str | None]:
    if log_format == "json":
        return json_line
    return classic_text if tuning.on("log_text") else formatEventAsClassicLogText


def twistd_observer(options: Mapping[str, Any],
                    log_format: str = "text") -> GatheringObserver | None:
    """The file observer twistd would make from its ``options`` (``ServerOptions``),
    writing ``classic_text`` (``json_line`` for ``log_format = json``); None where
    twistd's own choice should stand."""
    if options.get("logger") or options.get("syslog"):
        return None
    name = options.get("logfile") or ""
    nodaemon = options.get("nodaemon", False)
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            return None  # twistd refuses a daemon logging to stdout, with its message
        return GatheringObserver(sys.stdout, _line_format(log_format))
    log_file = LogFile.fromFullPath(name or "twistd.log")
    observer = GatheringObserver(log_file, _line_format(log_format))
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum, frame) -> None:
            from twisted.internet import reactor

            def flush_and_rotate() -> None:
                observer.flush()  # the lines before the signal stay in the old file
                log_file.rotate()

            reactor.callFromThread(flush_and_rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return observer
