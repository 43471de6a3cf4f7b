"""End to end through twistd: delivery runs in a process of its own that meets the relay at
the spool. It is restarted when it dies, stops with the relay (and without it), logs into
the relay's log, and takes the control panel's retry and delete over its socket."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import urllib.error
import urllib.request

import pytest
from harness import Relay, Sink, free_port, message, wait_for

PASSWORD = "correct horse battery"
LOGIN = ("doe.test", PASSWORD)


def make_relay(tmp_path, sink: Sink, extra: str = "", retry: str = "1s") -> Relay:
    relay = Relay(tmp_path / "relay", config=(
        f"[delivery]\nmode = smarthost\nsmarthost = 127.0.0.1:{sink.port}\n"
        f"smarthost_tls = none\nretry_first = {retry}\nretry_max = {retry}\n{extra}"))
    relay.domain_login("doe.test", PASSWORD)
    return relay


def submit(relay: Relay, rcpt: str = "bob@example.test", subject: str = "test") -> None:
    with relay.smtp(login=LOGIN) as c:
        assert c.sendmail("a@doe.test", [rcpt], message("a@doe.test", rcpt, subject)) == {}


def delivery_pids(relay: Relay) -> list[int]:
    return [int(p) for p in re.findall(r"delivery process (\d+) started", relay.log())]


def start(relay: Relay) -> int:
    """Start the relay; the pid of its delivery process."""
    relay.start()
    wait_for(lambda: delivery_pids(relay), what="the delivery process")
    return delivery_pids(relay)[0]


def stat_field(pid: int, index: int) -> int | None:
    """A number from /proc/<pid>/stat, counted from the field after the command name."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[index])
    except OSError:
        return None


def parent_of(pid: int) -> int | None:
    return stat_field(pid, 1)


def nice_of(pid: int) -> int | None:
    return stat_field(pid, 16)


def gone(pid: int) -> bool:
    """Not running (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def sink(tmp_path):
    s = Sink(tmp_path / "sink")
    yield s
    s.stop()


def test_delivery_is_a_child_process_restarted_after_a_crash(tmp_path, sink):
    relay = make_relay(tmp_path, sink)
    first = start(relay)
    try:
        assert parent_of(first) == relay.process.pid
        # Below the relay's priority: when the cores are busy, clients go first.
        wait_for(lambda: nice_of(first) == min(19, nice_of(relay.process.pid) + 5),
                 what="the delivery process's nice value")
        submit(relay, subject="before")
        sink.wait(1)
        # The delivery process's own log lines reach the relay's log.
        wait_for(lambda: re.search(r"to=<bob@example.test> via .* sent: 250", relay.log()),
                 what="a delivery line in the log")
        # Outbound connections log their outcome, not Twisted's factory chatter (the
        # listeners' factories start once, at startup).
        assert [line for line in relay.log().splitlines() if "factory" in line
                and "SubmissionFactory" not in line] == []

        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(delivery_pids(relay)) == 2, timeout=20,
                 what="a new delivery process")
        assert re.search(rf"delivery process {first} ended \(signal 9\); restarting",
                         relay.log())
        submit(relay, subject="after")  # accepted while or after it restarted
        received = sink.wait(2)
        assert sorted(json.dumps(meta["recipients"]) for meta, _ in received) == [
            '["bob@example.test"]'] * 2
        assert {data.split(b"Subject: ")[1].split(b"\r\n")[0] for _, data in received} == {
            b"before", b"after"}
        second = delivery_pids(relay)[-1]
        assert parent_of(second) == relay.process.pid
    finally:
        relay.stop()
    assert gone(second)


def test_a_message_committed_while_delivery_is_down_is_delivered(tmp_path, sink):
    relay = make_relay(tmp_path, sink)
    first = start(relay)
    try:
        os.kill(first, signal.SIGSTOP)  # frozen: announcements pile up unread
        for i in range(3):
            submit(relay, subject=f"frozen {i}")
        os.kill(first, signal.SIGKILL)
        received = sink.wait(3, timeout=60)
        assert len(received) == 3
        wait_for(lambda: not relay.spool_files("queue"), what="the queue to empty")
    finally:
        relay.stop()


def test_the_delivery_process_stops_when_the_relay_is_killed(tmp_path, sink):
    # Killed with a backlog being delivered: the process saves what it was doing and
    # stops, instead of delivering on beside the next relay's process.
    relay = make_relay(tmp_path, sink, extra="enabled = no\n")
    relay.start()
    with relay.smtp(login=LOGIN) as c:
        for i in range(400):
            c.sendmail("a@doe.test", ["bob@example.test"],
                       message("a@doe.test", "bob@example.test", f"m {i}"))
    relay.stop()
    relay.config_path.write_text(relay.config_path.read_text().replace(
        "enabled = no\n", "max_per_host = 2\n", 1))
    pid = start(relay)
    wait_for(lambda: len(list(sink.records.glob("*.json"))) >= 100, what="some deliveries")
    relay.kill9()
    wait_for(lambda: gone(pid), timeout=15, what="the orphaned delivery process to stop")
    assert relay.spool_files("queue"), "the backlog was not left for the next start"


def test_panel_retry_and_delete_reach_the_delivery_process(tmp_path, sink):
    sink.rules({"later@example.test": [451, "4.2.0 try later"]})
    port = free_port()
    relay = make_relay(tmp_path, sink, retry="1h", extra=(
        f"[admin]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
        f"public_url = http://127.0.0.1:{port}\n"))
    key = relay.admin("apikey", "add", "e2e", "--read-write").stdout.splitlines()[1]

    def api(method: str, path: str):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1{path}", method=method,
            headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def panel_up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    relay.start()
    try:
        wait_for(panel_up, what="the control panel")
        submit(relay, "later@example.test")
        [path] = relay.spool_files("queue")
        state = relay.data / "spool" / "state" / f"{path.name}.json"
        wait_for(state.exists, what="a deferred attempt")
        assert json.loads(state.read_text())["attempts"] == 1

        sink.rules({})
        status, doc = api("POST", f"/queue/{path.name}/retry")
        assert status < 300, doc
        sink.wait(1, timeout=30)  # an hour early: only the retry could send it
        wait_for(lambda: not relay.spool_files("queue"), what="the queue to empty")

        sink.rules({"later@example.test": [451, "4.2.0 try later"]})
        submit(relay, "later@example.test")
        [path] = relay.spool_files("queue")
        state = relay.data / "spool" / "state" / f"{path.name}.json"
        wait_for(state.exists, what="a deferred attempt")
        status, doc = api("DELETE", f"/queue/{path.name}")
        assert status < 300, doc
        assert not path.exists() and not state.exists()
        assert api("DELETE", f"/queue/{path.name}")[0] == 404
    finally:
        relay.stop()


def test_new_messages_written_over_delivered_ones_arrive_exactly(tmp_path, sink):
    # Delivered messages' files are kept in spool/spare/ and written over by the next
    # ones: what arrives is each message as sent, never a trace of an older, longer one.
    relay = make_relay(tmp_path, sink)
    spare = relay.data / "spool" / "spare"
    sent = {}

    def send(subject: str, body: str) -> None:
        sent[subject] = body.encode()
        with relay.smtp(login=LOGIN) as c:
            c.sendmail("a@doe.test", ["bob@example.test"],
                       message("a@doe.test", "bob@example.test", subject, body))

    first = start(relay)
    try:
        for i in range(4):
            send(f"long {i}", f"long message {i}\r\n" + "x" * 998 + "\r\n" * 20)
        sink.wait(4)
        wait_for(lambda: not relay.spool_files("queue") and any(spare.iterdir()),
                 what="delivered messages' files in spare/")
        spares = {path.stat().st_ino for path in spare.iterdir()}

        os.kill(first, signal.SIGSTOP)  # what comes next stays in the queue
        short = min(3, len(spares))
        for i in range(short):
            send(f"short {i}", f"short {i}\r\n")
        queued = {path.stat().st_ino for path in relay.spool_files("queue")}
        assert len(queued) == short and queued <= spares  # written over, no new files
        os.kill(first, signal.SIGCONT)

        received = sink.wait(4 + short)
        bodies = {data.split(b"Subject: ")[1].split(b"\r\n")[0].decode():
                  data.split(b"\r\n\r\n", 1)[1] for _, data in received}
        assert bodies == sent
    finally:
        relay.stop()


def _identity(path) -> tuple[int, int]:
    """A file as itself, not its name: a freed inode number may name a new file."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_the_relay_empties_spare_at_startup(tmp_path, sink):
    relay = make_relay(tmp_path, sink)
    spare = relay.data / "spool" / "spare"
    first = start(relay)
    try:
        submit(relay, subject="one")
        sink.wait(1)
        # The delivered message's file is a spare now, not one the next start would
        # still find in the queue and turn into a spare after the check below.
        wait_for(lambda: any(spare.iterdir()) and not relay.spool_files()
                 and not relay.spool_files("state"), what="a spare file, the queue empty")
        relay.kill9()  # no clean stop: whatever a crash leaves in spare/
    finally:
        relay.stop()
        if not gone(first):
            os.kill(first, signal.SIGKILL)  # it would stop by itself, a little later
    left = {_identity(p) for p in spare.iterdir()}  # what the crash left in spare/
    assert left
    start(relay)
    try:
        # None of it is there any more (a spare made since, by this run, may be).
        assert not {_identity(p) for p in spare.iterdir()} & left
        submit(relay, subject="two")
        assert len(sink.wait(2)) == 2
    finally:
        relay.stop()
