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

The plugin hands twistd the observer as the application's ``ILogObserver``, on the same
file twistd would have chosen from its options (``--logfile``, stdout with ``-n``, a
``SIGUSR1`` that rotates the file); ``--syslog`` and ``--logger`` stay twistd's.
"""

from __future__ import annotations

import atexit
import json
import signal
import sys
import threading
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
from twisted.python.logfile import LogFile
from zope.interface import implementer

FLUSH_DELAY = 0.05  # seconds an info line may wait to be written with others
MAX_GATHERED = 64 * 1024  # characters: more are written at once
_URGENT = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})

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
    fmt = event.get("log_format")
    text = None
    if type(fmt) is str and "()" not in fmt and "log_flattened" not in event:
        try:
            text = fmt.format_map(event)
        except Exception:
            pass
    if text is None:
        text = formatEvent(event)  # Twisted's own, including what it cannot format
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    elif type(system) is not str:
        try:
            system = str(system)
        except Exception:
            system = "UNFORMATTABLE"
    line = f"{_time_text(event.get('log_time'))} [{system}] {text}"
    if "\n" in line:
        line = line.replace("\n", "\n\t")
    return line + "\n"


_PLAIN = (str, int, float, bool, type(None))
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
        atexit.register(self.flush)

    def __call__(self, event: Mapping[str, Any]) -> None:
        text = self.format_event(event)
        if not text:
            return
        reactor = _running_reactor()
        urgent = (reactor is None or "log_failure" in event
                  or event.get("log_level") in _URGENT)
        with self._lock:
            self._lines.append(text)
            self._size += len(text)
            if urgent or self._size >= MAX_GATHERED:
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
        """With the lock held."""
        self._armed = False
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self._size = 0
            self.out.write(text)
            self.out.flush()


def _running_reactor():
    """The reactor if it is installed and running: gathered lines are sure to be
    written by a timer or at shutdown only then (before it runs, and after it stopped,
    every line goes at once)."""
    reactor = sys.modules.get("twisted.internet.reactor")
    return reactor if getattr(reactor, "running", False) else None


def json_observer(out: IO[str]) -> GatheringObserver:
    """What ``jsonFileLogObserver`` writes (RS, a record, LF), made by ``event_json``."""
    return GatheringObserver(out, lambda event: f"\x1e{event_json(event)}\n")


def twistd_observer(options: Mapping[str, Any]) -> GatheringObserver | None:
    """The file observer twistd would make from its ``options`` (``ServerOptions``),
    writing ``classic_text``; None where twistd's own choice should stand."""
    if options.get("logger") or options.get("syslog"):
        return None
    name = options.get("logfile") or ""
    nodaemon = options.get("nodaemon", False)
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            return None  # twistd refuses a daemon logging to stdout, with its message
        return GatheringObserver(sys.stdout, classic_text)
    log_file = LogFile.fromFullPath(name or "twistd.log")
    observer = GatheringObserver(log_file, classic_text)
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum, frame) -> None:
            from twisted.internet import reactor

            def flush_and_rotate() -> None:
                observer.flush()  # the lines before the signal stay in the old file
                log_file.rotate()

            reactor.callFromThread(flush_and_rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return observer
