"""Two twistd nodes sharing one PostgreSQL (tests/pg_server.py) for their users, last logins
and signing keys, each with its own data_dir: a user added, given a new password and
disabled through node A's mailrelay-admin is in force at node B's SMTP AUTH and MAIL
within a second of the command's return; a verification link made by A's panel confirms
on B's; a login on B shows as the last login in A's ``user list``."""

from __future__ import annotations

import json
import re
import smtplib
import socket
import time
import urllib.request

import pg_server
import pytest
from harness import Relay, free_port, message, wait_for

PASSWORD = "correct horse battery"
IN_FORCE = 1.0  # seconds: the requirement's bound from a change on A to B acting on it


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    assert pg_server.installed(), pg_server.NOT_INSTALLED
    dsn = pg_server.shared_server().create_database()
    tmp = tmp_path_factory.mktemp("pgusers")
    relays = []
    try:
        for name in ("a", "b"):
            port = free_port()
            relay = Relay(tmp / name, config=(
                f"[admin]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                f"public_url = http://127.0.0.1:{port}\n\n"
                "[delivery]\nenabled = no\n\n"
                # Logins refused while a change travels must not block the test's address.
                "[policy]\nlogin_delay_after = 1000\nlogin_block_after = 1000\n\n"
                f"[cluster]\npostgres = {dsn}\n"))  # fmt: skip
            relay.panel_url = f"http://127.0.0.1:{port}"
            relays.append(relay)
        a, b = relays
        a.admin("account", "set", "default", "--domains", "doe.test;shop.test")
        a.api_key = a.admin("apikey", "add", "e2e", "--read-write").stdout.splitlines()[1]
        for relay in relays:
            relay.start()
            wait_for(lambda r=relay: _panel_up(r), what="the control panel")
        yield a, b
    finally:
        for relay in relays:
            relay.stop()


def _panel_up(relay: Relay) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", int(relay.panel_url.rsplit(":", 1)[1])),
                                      timeout=1):
            return True
    except OSError:
        return False


def auth(relay: Relay, user: str, password: str) -> bool:
    try:
        with relay.smtp(login=(user, password)):
            return True
    except smtplib.SMTPAuthenticationError:
        return False


def mail_from(relay: Relay, user: str, password: str, sender: str) -> int:
    """The reply code to MAIL FROM ``sender`` after logging in (250: accepted)."""
    with relay.smtp(login=(user, password)) as client:
        code, _ = client.mail(sender)
        return code


def in_force_within(check, bound: float = IN_FORCE) -> float:
    """How long after now ``check()`` first held. Fails when no check begun within
    ``bound`` seconds held: one begun in time that holds shows the change in force by
    then, however long the check itself (a TLS handshake, a password hash) took."""
    start = time.monotonic()
    while True:
        begun = time.monotonic() - start
        if check():
            return begun
        if begun > bound:
            raise AssertionError(f"not in force on the other node within {bound}s")
        time.sleep(0.02)


def test_a_change_on_a_is_in_force_on_b_within_a_second(nodes):
    a, b = nodes
    password = PASSWORD
    a.add_user("doe.test", password)
    in_force_within(lambda: auth(b, "doe.test", password))

    a.admin("user", "passwd", "doe.test", "--password-stdin", input="second password 2\n")
    in_force_within(lambda: auth(b, "doe.test", "second password 2"))
    assert not auth(b, "doe.test", password)

    assert mail_from(b, "doe.test", "second password 2", "x@doe.test") == 250
    a.admin("user", "set", "doe.test", "--status", "blocked")
    in_force_within(lambda: mail_from(b, "doe.test", "second password 2", "x@doe.test") == 550)

    a.admin("user", "del", "doe.test")
    in_force_within(lambda: not auth(b, "doe.test", "second password 2"))


def api(relay: Relay, method: str, path: str, doc=None):
    request = urllib.request.Request(
        relay.panel_url + "/api/v1" + path, method=method,
        data=json.dumps(doc).encode() if doc is not None else None,
        headers={"authorization": f"Bearer {relay.api_key}", "content-type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_a_verification_link_made_on_a_confirms_on_b(nodes):
    a, b = nodes
    code, created = api(a, "POST", "/users", {"username": "mailer",
                                              "addresses": "sales@shop.test"})
    assert code == 201, created
    login = ("mailer", created["password"])
    in_force_within(lambda: auth(b, *login))
    assert mail_from(b, *login, "sales@shop.test") == 550  # not verified yet
    queue_id = created["verification"][0]["queue_id"]
    text = next(p for p in a.spool_files("queue") if p.name == queue_id).read_text()
    token = re.search(r"http://\S+/verify/(\S+)", text).group(1)
    with urllib.request.urlopen(urllib.request.Request(f"{b.panel_url}/verify/{token}",
                                                       data=b""), timeout=30) as page:
        assert b"is confirmed" in page.read()
    in_force_within(lambda: mail_from(b, *login, "sales@shop.test") == 250)


def test_a_login_on_b_is_the_last_login_in_a_user_list(nodes):
    a, b = nodes
    password = PASSWORD
    a.add_user("last.test@doe.test", password)
    in_force_within(lambda: auth(b, "last.test@doe.test", password))
    with b.smtp(login=("last.test@doe.test", password)) as client:
        client.sendmail("last.test@doe.test", ["x@example.net"],
                        message("last.test@doe.test", "x@example.net"))

    def listed():
        users = json.loads(a.admin("user", "list", "--json").stdout)
        return next(u for u in users if u["username"] == "last.test@doe.test")

    wait_for(lambda: listed()["last_login"] is not None, timeout=30, interval=0.5,
             what="the login on B in A's user list")
    assert listed()["last_login_ip"] == "127.0.0.1"
