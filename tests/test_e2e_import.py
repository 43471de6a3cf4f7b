"""Two twistd nodes: node A is killed with kill -9 while it accepts mail it cannot deliver
yet (the sink answers 451); `mailrelay-admin queue import` of A's data_dir on node B, and
every message A acknowledged is delivered exactly once."""

from __future__ import annotations

import json
import smtplib
import threading

from harness import Relay, Sink, message, wait_for

PASSWORD = "correct horse battery"
RCPT = "someone@x.test"


def node(tmp_path, name: str, sink: Sink) -> Relay:
    relay = Relay(tmp_path / name, config=(
        f"[delivery]\nretry_first = 1s\nretry_max = 2s\nmx_tls = none\n"
        f"[routes]\nx.test = 127.0.0.1:{sink.port}\n"))
    relay.domain_login("doe.test", PASSWORD)
    return relay


def test_killed_node_imported_by_another_delivers_each_message_once(tmp_path):
    sink = Sink(tmp_path / "sink")
    sink.rules({RCPT: [451, "4.2.0 later"]})
    a, b = node(tmp_path, "a", sink), node(tmp_path, "b", sink)
    acked: list[str] = []
    stop = threading.Event()

    def load() -> None:  # one client sending as fast as A takes it, until A dies
        try:
            with a.smtp(login=("doe.test", PASSWORD)) as client:
                for n in range(2000):
                    if stop.is_set():
                        return
                    subject = f"m{n}"
                    client.sendmail("s@doe.test", [RCPT], message("s@doe.test", RCPT, subject))
                    acked.append(subject)
        except (smtplib.SMTPException, OSError):
            pass  # A died mid-message: that one was never acknowledged

    try:
        a.start()
        b.start()
        sender = threading.Thread(target=load)
        sender.start()
        wait_for(lambda: len(acked) >= 30, what="30 messages accepted by A")
        a.kill9()
        stop.set()
        sender.join(timeout=30)
        assert not sink.messages()  # all deferred so far

        def imported():  # A's delivery process stops by itself once A is gone
            result = b.admin("queue", "import", str(a.data), "--json", check=False)
            assert "not told" not in result.stderr, result.stderr
            return result.returncode == 0 and json.loads(result.stdout)

        done = wait_for(imported, timeout=40, what="queue import of A's spool")
        # Only now: A's delivery process, still alive a moment after A, must not deliver.
        sink.rules({})
        assert len(done["queued"]) >= len(acked)
        assert done["relay_told"] is True
        got = sink.wait(len(acked))
        wait_for(lambda: not b.spool_files("queue"), what="B's queue to empty")
        subjects = [m.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                    for _, m in sink.messages()]
        assert len(subjects) == len(set(subjects)), "a message delivered twice"
        assert set(acked) <= set(subjects)
        assert len(got) >= len(acked)
        assert not a.spool_files("queue")
    finally:
        stop.set()
        a.stop()
        b.stop()
        sink.stop()
