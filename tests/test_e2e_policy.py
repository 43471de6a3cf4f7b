"""End to end through the real twistd process: the access policy (issue 5).

Rate limits, connection limits, statuses, IP and address authentication, brute-force
defence, sender notifications and slow clients, with real clients on loopback. Clients bind
their source address (127.0.0.2 ... are loopback too on Linux) where the client's address
matters. The time windows themselves (success after the hour) are tested with a Clock in
tests/test_smtp_limits.py; here only short real timeouts are used.
"""

from __future__ import annotations

import base64
import json
import select
import smtplib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness import Relay, message, wait_for

PASSWORD = "correct horse battery"
DOMAINS = "doe.test;app.test;limited.test;burst.test;many.test;switch.test;guess.test"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = Relay(
        tmp_path_factory.mktemp("policy"),
        config=(
            "[delivery]\nenabled = no\n\n"
            "[limits]\nmax_connections_per_ip = 45\n\n"
            "[policy]\n"
            "ip_auth = 127.0.0.2 = app.test; 127.0.0.6 = ghost.test\n"
            "address_auth = alerts@doe.test\n"
            "login_delay_after = 2\nlogin_block_after = 4\nlogin_max_delay = 1s\n"
        ),
    )
    r.admin("account", "set", "default", "--domains", DOMAINS)
    r.admin("account", "add", "acme", "--domains", "acme.test", "--notify", "it@acme.test")
    for user in ("doe.test", "app.test", "many.test", "switch.test", "guess.test"):
        r.add_user(user, PASSWORD)
    r.add_user("limited.test", PASSWORD, "--rate-limit", "3")
    r.add_user("burst.test", PASSWORD, "--rate-limit", "25")
    r.add_user("acme.test", PASSWORD, "--account", "acme")
    r.start()
    yield r
    r.stop()


def connect(relay, ip: str = "127.0.0.1", starttls: bool = True) -> smtplib.SMTP:
    """A client whose connection comes from ``ip``."""
    c = smtplib.SMTP("127.0.0.1", relay.smtp_port, local_hostname="client.test", timeout=30,
                     source_address=(ip, 0))
    c.ehlo()
    if starttls:
        c.starttls(context=relay.tls_context())
        c.ehlo()
    return c


def auth(client: smtplib.SMTP, username: str, password: str = PASSWORD) -> tuple[int, bytes]:
    """One AUTH PLAIN and its reply (smtplib.login would try other mechanisms after it)."""
    token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + token)


def transaction(client: smtplib.SMTP, sender: str, to: str = "rcpt@example.net"):
    """MAIL, RCPT, DATA: the first reply that is not a success, or the DATA reply."""
    for verb, arg in (("MAIL", f"FROM:<{sender}>"), ("RCPT", f"TO:<{to}>")):
        code, text = client.docmd(verb, arg)
        if code != 250:
            client.rset()
            return code, text
    return client.data(message(sender, to))


def envelopes(relay, state: str = "queue") -> dict[str, dict]:
    """Queue id -> envelope of every message in ``state`` (queue/ or hold/)."""
    found = {}
    for path in relay.spool_files(state):
        try:
            found[path.name] = json.loads(path.read_bytes().partition(b"\n")[0])
        except (OSError, ValueError):
            continue  # a file renamed away meanwhile
    return found


def queued_for(relay, user: str, state: str = "queue") -> set[str]:
    return {qid for qid, env in envelopes(relay, state).items() if env["user"] == user}


def queue_id(reply_text: bytes) -> str:
    return reply_text.decode().rsplit(" ", 1)[-1]


# -- rate limits


def test_over_the_hourly_limit_451_and_nothing_lost(relay):
    accepted = []
    with connect(relay) as c:
        assert auth(c, "limited.test")[0] == 235
        for _ in range(3):
            code, text = transaction(c, "a@limited.test")
            assert code == 250, text
            accepted.append(queue_id(text))
        code, text = c.docmd("MAIL", "FROM:<a@limited.test>")
        assert code == 451 and text.startswith(b"4.7.1 rate limit of 3 messages per hour")
        assert b"try again in " in text and text.endswith(b" seconds")
    # Another session of the user is refused as well; the first three are all queued.
    with connect(relay) as c:
        assert auth(c, "limited.test")[0] == 235
        assert transaction(c, "a@limited.test")[0] == 451
    assert queued_for(relay, "limited.test") == set(accepted)


def test_rate_limit_is_exact_under_parallel_sessions(relay):
    def client(_):
        codes = []
        with connect(relay) as c:
            assert auth(c, "burst.test")[0] == 235
            for _ in range(3):
                codes.append(transaction(c, "x@burst.test")[0])
        return codes

    with ThreadPoolExecutor(20) as pool:
        codes = [code for result in pool.map(client, range(20)) for code in result]
    assert codes.count(250) == 25 and codes.count(451) == 35
    assert len(queued_for(relay, "burst.test")) == 25


# -- connection limits


def test_41st_session_of_a_user_refused_and_a_closed_one_lets_a_new_one_in(relay):
    sessions = []
    try:
        for _ in range(40):
            c = connect(relay)
            assert auth(c, "many.test")[0] == 235
            sessions.append(c)
        extra = connect(relay)
        code, text = auth(extra, "many.test")
        assert code == 421 and text.startswith(b"4.7.0")
        with pytest.raises(OSError):  # closed after the 421
            extra.noop()
        sessions.pop().quit()

        def new_session_gets_in():
            c = connect(relay)
            if auth(c, "many.test")[0] == 235:
                sessions.append(c)
                return True
            c.close()
            return False

        wait_for(new_session_gets_in, timeout=10, interval=0.1, what="a free session place")
        assert transaction(sessions[-1], "a@many.test")[0] == 250
    finally:
        for c in sessions:
            c.close()


def test_connections_per_address(relay):
    socks = []
    try:
        for _ in range(45):
            s = socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10,
                                         source_address=("127.0.0.7", 0))
            socks.append(s)
            assert s.makefile("rb").readline().startswith(b"220 ")
        with pytest.raises(smtplib.SMTPConnectError) as e:
            smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10,
                         source_address=("127.0.0.7", 0))
        assert e.value.smtp_code == 421 and e.value.smtp_error.startswith(b"4.7.0 ")
        with connect(relay, ip="127.0.0.8") as c:  # another address is not affected
            assert c.noop()[0] == 250
    finally:
        for s in socks:
            s.close()


# -- status


def test_status_changes_apply_to_new_sessions_without_restart(relay):
    with connect(relay) as c:
        assert auth(c, "switch.test")[0] == 235
        assert transaction(c, "a@switch.test")[0] == 250

    relay.admin("user", "set", "switch.test", "--status", "blocked")

    def refused_as_blocked():
        with connect(relay) as c:
            assert auth(c, "switch.test")[0] == 235
            code, text = c.docmd("MAIL", "FROM:<a@switch.test>")
            return code == 550 and text.startswith(b"5.7.1") and b"blocked" in text

    wait_for(refused_as_blocked, timeout=10, interval=0.2, what="the blocked status")

    relay.admin("user", "set", "switch.test", "--status", "sandboxed")

    def accepted_into_hold():
        with connect(relay) as c:
            assert auth(c, "switch.test")[0] == 235
            code, text = transaction(c, "a@switch.test")
            return code == 250 and queue_id(text)

    held = wait_for(accepted_into_hold, timeout=10, interval=0.2, what="the sandboxed status")
    assert held in queued_for(relay, "switch.test", "hold")
    assert held not in queued_for(relay, "switch.test")


# -- logins without AUTH


def test_ip_authentication(relay):
    with connect(relay, ip="127.0.0.2", starttls=False) as c:
        code, text = transaction(c, "news@app.test")
        assert code == 250, text
        assert queue_id(text) in queued_for(relay, "app.test")
        code, text = c.docmd("MAIL", "FROM:<someone@doe.test>")  # outside its scope
        assert code == 550 and text.startswith(b"5.7.1")
    with connect(relay, ip="127.0.0.3", starttls=False) as c:
        code, text = c.docmd("MAIL", "FROM:<news@app.test>")
        assert code == 530 and text.startswith(b"5.7.0")
    # A network mapped to a user that does not exist: refused, and the admin is told.
    with connect(relay, ip="127.0.0.6") as c:
        assert c.docmd("MAIL", "FROM:<news@app.test>")[0] == 530
    wait_for(lambda: "ip_auth maps 127.0.0.6 to SMTP user ghost.test, which does not exist"
             in relay.log(), timeout=10, what="the warning in the log")


def test_address_authentication(relay):
    with connect(relay, starttls=False) as c:
        code, text = transaction(c, "alerts@doe.test")
        assert code == 250, text
        assert queue_id(text) in queued_for(relay, "alerts@doe.test")
        assert c.docmd("MAIL", "FROM:<boss@doe.test>")[0] == 530


# -- brute force


def test_password_guessing_is_delayed_then_blocked_while_the_user_logs_in_elsewhere(relay):
    replies = []
    for _ in range(4):  # the server closes after 3 failures on one connection
        c = connect(relay, ip="127.0.0.4")
        try:
            for _ in range(3):
                code, text = auth(c, "guess.test", "guess")
                replies.append(code)
                if code != 535:
                    break
        finally:
            c.close()
        if code == 421 and text.startswith(b"4.7.0 too many failed logins"):
            break
    assert replies[:4] == [535] * 4 and replies[-1] == 421
    with connect(relay, ip="127.0.0.4") as c:  # the address stays blocked, right password or not
        code, text = auth(c, "guess.test")
        assert code == 421 and b"too many failed logins" in text
    with connect(relay, ip="127.0.0.5") as c:
        assert auth(c, "guess.test")[0] == 235
        assert transaction(c, "a@guess.test")[0] == 250
    wait_for(lambda: "login failures: blocked ip=127.0.0.4 user=guess.test" in relay.log(),
             what="the block in the log")
    assert "login failures: delaying ip=127.0.0.4 user=guess.test" in relay.log()


# -- notifications


def test_a_spoofing_attempt_notifies_the_account_once(relay):
    def notifications():
        return [qid for qid, env in envelopes(relay).items()
                if env["recipients"] == ["it@acme.test"]]

    with connect(relay) as c:
        assert auth(c, "acme.test")[0] == 235
        code, text = c.docmd("MAIL", "FROM:<ceo@doe.test>")
        assert code == 550 and text.startswith(b"5.7.1")
        wait_for(notifications, timeout=10, what="the notification in the queue")
        for _ in range(3):  # more attempts inside the interval are only collected
            assert c.docmd("MAIL", "FROM:<ceo@doe.test>")[0] == 550
        assert transaction(c, "x@acme.test")[0] == 250  # one more commit behind them
    [qid] = notifications()
    envelope_line, _, body = (relay.data / "spool" / "queue" / qid).read_bytes().partition(b"\n")
    assert json.loads(envelope_line)["sender"] == ""
    assert b"acme.test" in body and b"ceo@doe.test" in body and b"127.0.0.1" in body


# -- slow clients


@pytest.fixture(scope="module")
def slow_relay(tmp_path_factory):
    r = Relay(
        tmp_path_factory.mktemp("slow"),
        config=("[delivery]\nenabled = no\n\n"
                "[limits]\nidle_timeout = 2s\ndata_timeout = 3s\nsession_timeout = 4s\n"),
    )
    r.domain_login("doe.test", PASSWORD)
    r.start()
    yield r
    r.stop()


def read_until_closed(sock: socket.socket, limit: float = 15.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_a_silent_client_is_timed_out(slow_relay):
    with socket.create_connection(("127.0.0.1", slow_relay.smtp_port), timeout=15) as s:
        data = read_until_closed(s)
    greeting, timeout = data.decode().splitlines()
    assert greeting.startswith("220 ")
    assert timeout == "421 4.4.2 relay.test Error: timeout exceeded"


def test_a_client_dripping_data_is_cut_off_and_nothing_kept(slow_relay):
    c = slow_relay.smtp(login=("doe.test", PASSWORD))
    c.mail("a@doe.test")
    c.rcpt("b@example.net")
    c.putcmd("data")
    assert c.getreply()[0] == 354
    sock, reply = c.sock, b""
    for _ in range(40):  # a byte every half second: never idle, but slower than data_timeout
        try:
            sock.sendall(b"x")
        except OSError:
            break
        if select.select([sock], [], [], 0.5)[0]:
            reply = sock.recv(4096)
            break
    assert reply.startswith(b"421 4.4.2") and b"DATA timeout" in reply
    c.close()
    assert slow_relay.spool_files() == [] and slow_relay.spool_files("hold") == []
    wait_for(lambda: not list((slow_relay.data / "spool" / "tmp").iterdir()), timeout=10,
             what="tmp/ to be empty")


def test_a_client_holding_the_connection_with_noops_is_closed(slow_relay):
    c = slow_relay.smtp(login=("doe.test", PASSWORD))
    replies = []
    for _ in range(40):  # NOOPs keep it idle-alive; the session timeout still ends it
        try:
            replies.append(c.noop())
        except smtplib.SMTPServerDisconnected:
            break
        time.sleep(0.5)
    assert replies[-1] == (421, b"4.4.2 relay.test Error: session timeout exceeded")
    assert all(code == 250 for code, _ in replies[:-1])
    c.close()
