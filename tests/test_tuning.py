"""mailrelay/tuning.py: each optimisation past Twisted's public API has a switch, and with
it off the stock path is really the one used."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mailrelay import tuning

# What each site uses, asked in a fresh interpreter (the switch is read once, at import).
PROBE = r"""
import json
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.logger import formatEventAsClassicLogText
from twisted.mail import smtp

from mailrelay.auth import hashing
from mailrelay.delivery.client import RelayClient
from mailrelay.listener import PromptWrites
from mailrelay import logtext

port = PromptWrites(reactor).listenTCP(0, Factory(), interface="127.0.0.1")
observer = logtext.twistd_observer({"nodaemon": True})
event = {"log_format": "x {n}", "n": 1, "log_namespace": "t", "log_time": 1.0}
print(json.dumps({
    "port": f"{type(port).__module__}.{type(port).__qualname__}",
    "setattr": "ESMTPClient" if RelayClient.__setattr__ is smtp.ESMTPClient.__setattr__
               else "object" if RelayClient.__setattr__ is object.__setattr__ else "?",
    "lines": "twisted" if observer.format_event is formatEventAsClassicLogText
             else observer.format_event.__name__,
    "records_flattened": "log_flattened" in logtext.json_observer(None).format_event(event),
    "mmap_threshold_fixed": hashing._fix_mmap_threshold(),
}))
port.stopListening()
"""


def probe(stock: str | None) -> dict:
    from harness import env

    environment = {k: v for k, v in env().items() if k != tuning.ENVIRONMENT}
    if stock is not None:
        environment[tuning.ENVIRONMENT] = stock
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=environment, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_with_every_switch_off_the_stock_paths_are_used():
    assert probe("all") == {"port": "twisted.internet.tcp.Port", "setattr": "ESMTPClient",
                            "lines": "twisted", "records_flattened": True,
                            "mmap_threshold_fixed": False}


def test_by_default_every_optimisation_is_on():
    assert probe(None) == {"port": "mailrelay.listener._PromptPort", "setattr": "object",
                           "lines": "classic_text", "records_flattened": False,
                           "mmap_threshold_fixed": True}


def test_one_switch_turns_off_only_its_own():
    got = probe("prompt_writes, log_text")
    assert (got["port"], got["lines"], got["setattr"], got["mmap_threshold_fixed"]) == (
        "twisted.internet.tcp.Port", "twisted", "object", True)


@pytest.mark.parametrize("value, off, unknown", [
    ("", set(), set()),
    ("all", tuning.NAMES, set()),
    ("1", tuning.NAMES, set()),
    ("client_setattr,", {"client_setattr"}, set()),
    ("mmap_threshold,nagle", {"mmap_threshold"}, {"nagle"}),
])
def test_the_variable(value, off, unknown):
    assert tuning.parse(value) == (off, unknown)


def test_every_optimisation_says_what_it_touches_and_what_it_gains():
    for o in tuning.OPTIMISATIONS:
        assert o.site.startswith("mailrelay/") and o.touches and o.figure
        assert os.path.exists(o.site.split(":")[0]), o.site
    with pytest.raises(KeyError):
        tuning.on("no_such_thing")


def test_an_unknown_name_stops_twistd_and_check_with_the_same_line(tmp_path, monkeypatch):
    from harness import env, run_twistd

    text = ("[server]\nhostname = relay.test\ndata_dir = {data}\n[listener:smtp]\n"
            "endpoint = tcp:0:interface=127.0.0.1\n[delivery]\nenabled = no\n[admin]\n"
            "enabled = no\n").format(data=tmp_path / "data")
    config = tmp_path / "mailrelay.ini"
    config.write_text(text)
    monkeypatch.setenv(tuning.ENVIRONMENT, "prompt_writes,nagle")
    check = subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c", str(config),
                            "check"], capture_output=True, text=True, env=env(), timeout=60)
    started = run_twistd(tmp_path, text)
    line = ("MAILRELAY_STOCK: unknown nagle (known: all, prompt_writes, client_setattr, "
            "log_text, mmap_threshold)")
    assert started.returncode != 0 and check.returncode != 0
    assert started.stderr.strip().splitlines() == [f"mailrelay: {line}"]
    assert check.stderr.strip().splitlines() == [f"mailrelay-admin: {line}"]
