"""The optimisations that reach past the public API of Twisted (or of glibc), in one list.

Each one makes a measured difference (the figure below), and each relies on something its
owner may change in any release: a private module, a private attribute, the exact text of
a format. So each has a switch back to the stock path, and CI runs the suite a second time
with every switch off (test.sh): after a Twisted upgrade, a test that fails with the
optimisations on and passes with them off names the one that broke.

The switch is ``MAILRELAY_STOCK`` in the environment, read once, when this module is first
imported (the delivery process inherits it from the relay):

- unset or empty: every optimisation on (the default);
- ``all`` (or ``1``): every one off, the stock Twisted (and glibc) paths throughout;
- names separated by commas, e.g. ``prompt_writes,log_text``: those off.

A name that is not in the list stops startup with one line. The code at each site asks
``on(name)``; turned off, it runs exactly what Twisted (or glibc) would without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from twisted.logger import Logger

log = Logger()

ENVIRONMENT = "MAILRELAY_STOCK"


@dataclass(frozen=True)
class Optimisation:
    name: str
    site: str  # where the code is
    touches: str  # the private part it relies on
    figure: str  # what it gains, as measured (bench/README.md, the commit that made it)


OPTIMISATIONS = (
    Optimisation(
        "prompt_writes",
        "mailrelay/listener.py: PromptWrites and its port, connection and TLS bypass; "
        "mailrelay/cluster/connection.py: a Redis connection's writes",
        "twisted.internet._newtls.startTLS; a connection's dataBuffer, _tempDataLen, "
        "_writeDisconnected, producerPaused; subclasses of tcp.Port and tcp.Server",
        "an SMTP reply leaves when it is made, not a reactor loop turn later: two "
        "epoll_ctl calls and one loop turn fewer per reply (strace); off, replies wait "
        "for the loop as on any Twisted server",
    ),
    Optimisation(
        "client_setattr",
        "mailrelay/delivery/client.py: RelayClient.__setattr__",
        "ESMTPClient.__setattr__, a Python-level hook there only to warn about the "
        "deprecated tlsMode, replaced by object.__setattr__",
        "about 50 Python calls fewer per delivered message (every attribute write of "
        "the client's state machine)",
    ),
    Optimisation(
        "log_text",
        "mailrelay/logtext.py: classic_text for the log file, event_json for the "
        "delivery process's records",
        "the exact text of formatEventAsClassicLogText, and records eventFromJSON "
        "reads without eventAsJSON's flattening (its marker for log levels)",
        "19 -> 5 us per log line, the relay's reactor thread 0.61 -> 0.51 ms per "
        "message; 20 -> 4.5 us per record of the delivery process (bench/README.md)",
    ),
    Optimisation(
        "mmap_threshold",
        "mailrelay/auth/hashing.py: _fix_mmap_threshold",
        "glibc's mallopt(M_MMAP_THRESHOLD, 1 MiB) through ctypes, when the password "
        "hashing pool starts",
        "each 19 MiB argon2id block given back when freed: 1,000 idle TLS sessions of "
        "distinct users, relay and delivery process 151 -> 112 MB",
    ),
)

NAMES = frozenset(o.name for o in OPTIMISATIONS)


def parse(value: str) -> tuple[frozenset[str], frozenset[str]]:
    """``MAILRELAY_STOCK``'s value: (the optimisations it turns off, unknown names)."""
    value = value.strip()
    if value.lower() in ("all", "1"):
        return NAMES, frozenset()
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    return names & NAMES, names - NAMES


OFF, UNKNOWN = parse(os.environ.get(ENVIRONMENT, ""))


def on(name: str) -> bool:
    """Whether the optimisation ``name`` is in use."""
    if name not in NAMES:
        raise KeyError(f"no optimisation {name!r} in mailrelay.tuning")
    return name not in OFF


def startup_problem() -> str | None:
    """The line that stops startup (unknown names), or None."""
    if not UNKNOWN:
        return None
    return (f"{ENVIRONMENT}: unknown {', '.join(sorted(UNKNOWN))} "
            f"(known: all, {', '.join(o.name for o in OPTIMISATIONS)})")


def log_state() -> None:
    """One line at startup naming the optimisations switched off, if any."""
    if OFF:
        off = [o.name for o in OPTIMISATIONS if o.name in OFF]
        log.info("stock Twisted paths ({variable}): {names} off",
                 variable=ENVIRONMENT, names=", ".join(off))
