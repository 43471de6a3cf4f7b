"""End to end through twistd: the per-user features of issue 6.

A real relay delivers to a real SMTP sink (every test domain is routed to it) and serves
its tracking endpoint on loopback; mail goes in with smtplib, links are followed with
urllib, and what arrives is parsed back with the email package. Each SMTP user of the
shared relay has one combination of features, so tests do not see each other's counts.
"""

from __future__ import annotations

import email
import html
import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from email.message import EmailMessage
from email.policy import SMTP, default

import mime_samples as samples
import pytest
from harness import Relay, Sink, free_port, run_twistd, wait_for

from mailrelay.features.archive import DAY, Archive

PASSWORD = "correct horse battery"
# user -> `mailrelay-admin user set` options
USERS = {
    "plain@doe.test": [],
    "news@doe.test": ["--unsubscribe-footer", "--open-tracking", "--click-tracking",
                      "--archive"],
    "footer@doe.test": ["--unsubscribe-footer"],
    "audit@doe.test": ["--audit-bcc", "auditor@corp.test", "--unsubscribe-footer"],
    "quiet@doe.test": ["--bounce-notify", "off"],
    "ops@doe.test": ["--bounce-notify", "postbox@corp.test"],
    "stats@doe.test": ["--unsubscribe-footer", "--open-tracking", "--click-tracking"],
    "unsub@doe.test": ["--unsubscribe-footer"],
    "sandbox@doe.test": ["--status", "sandboxed"],
}  # fmt: skip
HARD = "gone@example.test"  # the sink refuses it: 550 5.1.1


def make_relay(directory, sink: Sink, tracking: bool = True, extra: str = "") -> Relay:
    port = free_port()
    config = (
        f"[directory]\nlogin_cache_ttl = 0\n\n"
        f"[delivery]\nport = {sink.port}\nallow_local_mx = yes\nretry_first = 1s\n"
        f"retry_max = 2s\nmx_tls = none\n\n"
        f"[routes]\ndoe.test = 127.0.0.1:{sink.port}\nexample.test = 127.0.0.1:{sink.port}\n"
        f"corp.test = 127.0.0.1:{sink.port}\n\n"
        f"[features]\nstats_flush_interval = 0.2s\n{extra}\n"
        f"[tracking]\nenabled = {'yes' if tracking else 'no'}\n"
        f"endpoint = tcp:{port}:interface=127.0.0.1\nbase_url = http://127.0.0.1:{port}\n"
    )  # fmt: skip
    relay = Relay(directory, config=config)
    relay.tracking_url = f"http://127.0.0.1:{port}"
    relay.tracking_port = port
    relay.admin("account", "set", "default", "--domains", "doe.test")
    for user, options in USERS.items():
        relay.add_user(user, PASSWORD, *options)
    return relay


def start(relay: Relay) -> None:
    relay.start()

    def tracking_up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=1):
                return True
        except OSError:
            return False

    if "enabled = yes" in relay.config_path.read_text():
        wait_for(tracking_up, what="the tracking endpoint")


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    s = Sink(tmp_path_factory.mktemp("sink"))
    s.rules({HARD: [550, "5.1.1 no such user"]})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("relay"), sink)
    start(r)
    yield r
    r.stop()


# ---- helpers ----


def rcpt(name: str) -> str:
    """A recipient no other test uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}@example.test"


def html_message(sender: str, to: str, subject: str = "news") -> bytes:
    m = EmailMessage(policy=SMTP)
    m["From"] = f"News <{sender}>"
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = f"<{uuid.uuid4().hex}@doe.test>"
    m.set_content("Hello,\nthe sale is on: https://shop.example/sale\n")
    m.add_alternative(
        '<html><body><p>Hello, the <a href="https://shop.example/sale?a=1&amp;b=2">sale</a>'
        ' is on. <a href="mailto:shop@doe.test">Write to us</a>.</p></body></html>\n',
        subtype="html",
    )
    return m.as_bytes()


def send(relay: Relay, user: str, rcpts: list[str], data: bytes | None = None) -> str:
    """Submit as ``user`` (sending from its own address); returns the queue id."""
    data = data if data is not None else html_message(user, rcpts[0])
    with relay.smtp(login=(user, PASSWORD)) as client:
        client.mail(user)
        for r in rcpts:
            assert client.rcpt(r)[0] == 250
        code, text = client.data(data)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def arrived(sink: Sink, to: str, count: int = 1, timeout: float = 30) -> list[tuple[dict, bytes]]:
    """The messages that reached the sink for ``to`` (waits for ``count``)."""
    return wait_for(
        lambda: (m := [(meta, data) for meta, data in sink.messages()
                       if to in meta["recipients"]]) and len(m) >= count and m,
        timeout=timeout, what=f"{count} message(s) for {to}",
    )  # fmt: skip


def done(relay: Relay, queue_id: str) -> None:
    """Wait until ``queue_id`` has left the queue (delivered, suppressed or bounced)."""
    path = relay.data / "spool" / "queue" / queue_id
    wait_for(lambda: not path.exists(), timeout=30, what=f"{queue_id} to leave the queue")


def logged(relay: Relay, text: str) -> None:
    wait_for(lambda: text in relay.log(), timeout=20, what=f"{text!r} in the log")


def stats(relay: Relay, user: str) -> dict:
    return json.loads(relay.admin("stats", user, "--json").stdout)["totals"]


def wait_stats(relay: Relay, user: str, expected: dict) -> dict:
    def matches():
        totals = stats(relay, user)
        return totals if all(totals[k] == v for k, v in expected.items()) else None

    try:
        return wait_for(matches, timeout=20, interval=0.2, what=f"statistics of {user}")
    except TimeoutError:
        raise AssertionError(f"{user}: {stats(relay, user)} is not {expected}")


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=default)


def unsubscribe_url(msg: EmailMessage) -> str:
    (url,) = re.findall(r"<(http[^>]+)>", str(msg["List-Unsubscribe"]))
    return url


def links(msg: EmailMessage, kind: str) -> list[str]:
    content = msg.get_body(("html",)).get_content()
    return [html.unescape(u) for u in re.findall(rf'"(http://127\.0\.0\.1:\d+/{kind}/[^"]+)"',
                                                 content)]  # fmt: skip


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 302 itself is what the tests look at


_opener = urllib.request.build_opener(_NoRedirect)


def http(url: str, data: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of a GET (or a POST with ``data``)."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with _opener.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def one_click(url: str):
    """The POST a mailbox provider sends for List-Unsubscribe-Post (RFC 8058 example:
    multipart/form-data)."""
    body = (b"--XYZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
            b"One-Click\r\n--XYZ--\r\n")  # fmt: skip
    return http(url, body, {"Content-Type": "multipart/form-data; boundary=XYZ"})


# ---- audit BCC ----


def test_audit_bcc_is_delivered_but_in_no_header(relay, sink):
    bob = rcpt("bob")
    queue_id = send(relay, "audit@doe.test", [bob])
    (meta, data), = arrived(sink, "auditor@corp.test")
    assert meta["recipients"] == ["auditor@corp.test"]
    assert b"auditor" not in data  # the original, unchanged: no footer for the auditor
    assert queue_id.encode() in data and b"List-Unsubscribe" not in data
    (meta, data), = arrived(sink, bob)
    assert meta["recipients"] == [bob]
    assert b"auditor" not in data.lower()  # nothing the recipient sees names the auditor
    assert "List-Unsubscribe" in parse(data)  # the user's footer, for the real recipient
    # Without audit BCC: the recipients given, and no one else.
    carol = rcpt("carol")
    send(relay, "plain@doe.test", [carol])
    (meta, _), = arrived(sink, carol)
    assert meta["recipients"] == [carol]


# ---- bounce notifications ----


def test_bounce_notification_to_sender_address_or_none(relay, sink):
    ids = {user: send(relay, user, [HARD], html_message(user, HARD, f"to {user}"))
           for user in ("plain@doe.test", "ops@doe.test", "quiet@doe.test")}  # fmt: skip
    for queue_id in ids.values():
        done(relay, queue_id)
    (meta, data), = arrived(sink, "plain@doe.test")  # sender: to the envelope sender
    assert meta["sender"] == "" and ids["plain@doe.test"].encode() in data
    assert parse(data).get_content_type() == "multipart/report"
    (meta, data), = arrived(sink, "postbox@corp.test")  # an address: there, not the sender
    assert meta["sender"] == "" and ids["ops@doe.test"].encode() in data
    logged(relay, f"{ids['quiet@doe.test']}: no bounce for {HARD}")  # off: none at all
    dsns = [data for meta, data in sink.messages() if meta["sender"] == ""]
    assert not any(ids["ops@doe.test"].encode() in d and b"To: <ops@doe.test>" in d
                   for d in dsns)  # fmt: skip
    assert not any(ids["quiet@doe.test"].encode() in d for d in dsns)


# ---- the unsubscribe footer on real-world MIME shapes ----

SHAPES = {
    "plain": samples.plain,
    "html": samples.html_only,
    "alternative": samples.alternative,
    "mixed": samples.mixed_with_attachments,
    "nested": samples.nested,
    "latin1-qp": lambda: samples.latin1("iso-8859-1", "quoted-printable"),
    "cp1252-8bit": lambda: samples.latin1("windows-1252", "8bit"),
    "base64": samples.base64_parts,
}


def _from_user(data: bytes, user: str) -> bytes:
    return data.replace(b"news@shop.example", user.encode())


def test_footer_on_mime_shapes(relay, sink):
    sent = {}
    for name, make in SHAPES.items():
        to = rcpt(name)
        original = _from_user(make(), "footer@doe.test")
        sent[name] = (to, original, send(relay, "footer@doe.test", [to], original))
    for name, (to, original, queue_id) in sent.items():
        (meta, data), = arrived(sink, to)
        msg = parse(data)
        sent_msg = parse(original)
        assert msg.get_content_type() == sent_msg.get_content_type(), name
        url = unsubscribe_url(msg)
        assert url.startswith(relay.tracking_url + "/u/"), name
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click", name
        bodies = [p for p in msg.walk() if p.get_content_type() in ("text/plain", "text/html")
                  and not p.is_attachment()]  # fmt: skip
        for part in bodies:
            text = part.get_content()
            expected = html.escape(url) if part.get_content_subtype() == "html" else url
            assert expected in text and to in text, (name, part.get_content_type())
            assert "/o/" not in text and "/c/" not in text, name  # tracking is off for them
        # Everything else is as it was: attachments byte for byte, charsets kept.
        for before, after in zip(sent_msg.walk(), msg.walk(), strict=True):
            assert before.get_content_type() == after.get_content_type(), name
            if before.is_attachment():
                assert before.get_content() == after.get_content(), name
            elif before.get_content_maintype() == "text":
                assert after.get_content_charset() == before.get_content_charset(), name
                # The footer is added after the text, or before </body>: nothing removed.
                head = re.split("</body>", before.get_content(), flags=re.I)[0].rstrip()
                assert after.get_content().startswith(head), name
        assert sent_msg["Subject"] == msg["Subject"] and queue_id in msg["Received"]


def test_footer_not_applied_where_unsafe(relay, sink):
    to = rcpt("signed")
    original = _from_user(samples.smime_signed(), "footer@doe.test")
    queue_id = send(relay, "footer@doe.test", [to], original)
    (meta, data), = arrived(sink, to)
    assert data.endswith(original)  # byte for byte after the relay's Received: header
    logged(relay, f"{queue_id}: sent without footer/tracking: signed or encrypted")


def test_no_footer_for_users_without_it(relay, sink):
    to = rcpt("nofooter")
    original = html_message("plain@doe.test", to)
    send(relay, "plain@doe.test", [to], original)
    (meta, data), = arrived(sink, to)
    assert data.endswith(original)


# ---- unsubscribing ----


def test_unsubscribe_by_get_confirmation_then_suppressed(relay, sink):
    alice = rcpt("alice")
    send(relay, "unsub@doe.test", [alice])
    (_, data), = arrived(sink, alice)
    url = unsubscribe_url(parse(data))
    status, headers, page = http(url)
    assert status == 200 and alice.encode() in page
    assert b'method="post"' in page and b'name="List-Unsubscribe" value="One-Click"' in page
    # Looking at the page (as a mail scanner does) unsubscribes nobody.
    send(relay, "unsub@doe.test", [alice])
    arrived(sink, alice, 2)
    # The form's button: a browser posts the form back to the page's URL.
    status, _, page = http(url, b"List-Unsubscribe=One-Click",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and b"will get no more" in page
    listed = json.loads(relay.admin("suppression", "list", "--user", "unsub@doe.test",
                                    "--json").stdout)  # fmt: skip
    assert [(e["address"], e["reason"]) for e in listed] == [(alice, "unsubscribe")]
    queue_id = send(relay, "unsub@doe.test", [alice])
    logged(relay, f"{queue_id}: {alice} is suppressed for unsub@doe.test")
    done(relay, queue_id)
    assert len(arrived(sink, alice, 2)) == 2  # not a third time
    # Another user's mail to the same address still goes: lists are per user.
    send(relay, "plain@doe.test", [alice])
    arrived(sink, alice, 3)


def test_one_click_post_then_suppressed(relay, sink):
    dave = rcpt("dave")
    send(relay, "unsub@doe.test", [dave])
    (_, data), = arrived(sink, dave)
    url = unsubscribe_url(parse(data))
    assert http(url, b"")[0] == 400  # a POST without the one-click body does nothing
    status, _, _ = one_click(url)
    assert status == 200
    assert one_click(url)[0] == 200  # twice is harmless
    queue_id = send(relay, "unsub@doe.test", [dave, rcpt("erin")])
    logged(relay, f"{queue_id}: {dave} is suppressed")
    done(relay, queue_id)
    assert len(arrived(sink, dave)) == 1


# ---- tracking ----


def test_open_and_click_tracking_with_a_real_http_client(relay, sink):
    frank = rcpt("frank")
    send(relay, "news@doe.test", [frank])
    (_, data), = arrived(sink, frank)
    msg = parse(data)
    (click,) = links(msg, "c")  # the http link; mailto: is left alone
    assert "mailto:shop@doe.test" in msg.get_body(("html",)).get_content()
    (pixel,) = links(msg, "o")
    assert "/c/" not in unsubscribe_url(msg)  # the unsubscribe link is not tracked
    assert "https://shop.example/sale" in msg.get_body(("plain",)).get_content()  # text: as is

    status, headers, body = http(pixel)
    assert status == 200 and headers["Content-Type"] == "image/gif" and body[:6] == b"GIF89a"
    status, headers, _ = http(click)
    assert status == 302 and headers["Location"] == "https://shop.example/sale?a=1&b=2"
    # Never an open redirect: only the signed target, whatever the query says.
    status, headers, _ = http(click + "?url=https://evil.example/")
    assert status == 302 and headers["Location"] == "https://shop.example/sale?a=1&b=2"
    token = click.rsplit("/", 1)[1]
    payload, tag = token.split(".")
    flipped = payload[:5] + ("A" if payload[5] != "A" else "B") + payload[6:]
    for forged in (
        f"{relay.tracking_url}/c/{flipped}.{tag}",  # target or recipient changed
        f"{relay.tracking_url}/c/{payload}.{tag[:-1]}",  # signature cut
        f"{relay.tracking_url}/c/{uuid.uuid4().hex}.{uuid.uuid4().hex}",  # made up
        pixel.replace("/o/", "/c/"),  # an open token is no click token
        click.replace("/c/", "/u/"),  # nor an unsubscribe token
        f"{relay.tracking_url}/c/",
        f"{relay.tracking_url}/redirect?url=https://evil.example/",
    ):
        status, headers, _ = http(forged)
        assert status == 404 and "Location" not in headers, forged
    assert one_click(pixel.replace("/o/", "/u/"))[0] == 404
    totals = wait_stats(relay, "news@doe.test", {"opens": 1, "clicks": 2})
    assert totals["unsubscribes"] == 0


def test_archive_list(relay, sink):
    to = rcpt("archived")
    queue_id = send(relay, "news@doe.test", [to], html_message("news@doe.test", to,
                                                               "Archived news"))  # fmt: skip

    def listed():
        out = json.loads(relay.admin("archive", "list", "news@doe.test", "--json").stdout)
        return [e for e in out if queue_id in e["id"]]

    (entry,) = wait_for(listed, timeout=20, what="the archive copy")
    assert entry["subject"] == "Archived news" and entry["sender"] == "news@doe.test"
    text = relay.admin("archive", "list", "news@doe.test").stdout
    assert "Archived news" in text
    # A user without archiving has none.
    send(relay, "plain@doe.test", [rcpt("x")])
    none = relay.admin("archive", "list", "plain@doe.test")
    assert "no archived messages" in none.stderr


# ---- statistics ----


def test_statistics_match_what_happened(relay, sink):
    user = "stats@doe.test"
    r1, r2, later = rcpt("r1"), rcpt("r2"), rcpt("later")
    sink.rules({HARD: [550, "5.1.1 no such user"], later: [451, "4.2.0 greylisted"]})
    try:
        deferred_id = send(relay, user, [later])
        logged(relay, f"{deferred_id} to=<{later}> via 127.0.0.1 deferred")
    finally:
        sink.rules({HARD: [550, "5.1.1 no such user"]})
    arrived(sink, later)
    deferrals = relay.log().count(f"to=<{later}> via 127.0.0.1 deferred")
    first = send(relay, user, [r1, r2, HARD])
    (_, one), = arrived(sink, r1)
    (_, two), = arrived(sink, r2)
    done(relay, first)
    assert http(links(parse(one), "o")[0])[0] == 200
    assert http(links(parse(one), "o")[0])[0] == 200
    assert http(links(parse(one), "c")[0])[0] == 302
    assert one_click(unsubscribe_url(parse(two)))[0] == 200
    second = send(relay, user, [r1, r2, HARD])  # r2 unsubscribed, HARD bounced: suppressed
    done(relay, second)
    with relay.smtp(login=(user, PASSWORD)) as client:  # a sender outside the scope
        assert client.mail("other@doe.test")[0] == 550
    assert len(arrived(sink, r1, 2)) == 2 and len(arrived(sink, r2)) == 1
    expected = {"accepted": 3, "delivered": 4, "bounced": 1, "suppressed": 2, "opens": 2,
                "clicks": 1, "unsubscribes": 1, "rejected": 1, "deferred": deferrals,
                "sandboxed": 0}  # fmt: skip
    wait_stats(relay, user, expected)
    listed = json.loads(relay.admin("suppression", "list", "--user", user, "--json").stdout)
    assert sorted((e["address"], e["reason"]) for e in listed) == sorted(
        [(r2, "unsubscribe"), (HARD, "hard-bounce")])
    # A sandboxed user's mail is accepted and counted, never delivered.
    send(relay, "sandbox@doe.test", [rcpt("held")])
    wait_stats(relay, "sandbox@doe.test", {"accepted": 1, "sandboxed": 1, "delivered": 0})


# ---- the features without the tracking endpoint; archive retention ----


def test_tracking_off_sends_unchanged_and_archive_is_pruned(tmp_path, sink):
    relay = make_relay(tmp_path / "relay", sink, tracking=False, extra="archive_retention = 1d\n")
    archive = Archive(str(relay.data / "archive"))
    now = time.time()
    archive.store("news@doe.test", "3000000000000aaaaaa", b"Subject: old\r\n\r\nx\r\n",
                  "news@doe.test", ["a@example.test"], when=now - 2 * DAY)  # fmt: skip
    archive.store("news@doe.test", "3000000000000bbbbbb", b"Subject: recent\r\n\r\nx\r\n",
                  "news@doe.test", ["a@example.test"], when=now - DAY / 2)  # fmt: skip
    start(relay)
    try:
        logged(relay, "[tracking] is disabled: no unsubscribe footer or tracking for")
        to = rcpt("untracked")
        original = html_message("news@doe.test", to)
        send(relay, "news@doe.test", [to], original)
        (_, data), = arrived(sink, to)
        assert data.endswith(original)  # no footer, no pixel, links as they were
        logged(relay, "user news@doe.test has footer, opens, clicks on but [tracking] is "
               "disabled")  # fmt: skip

        def subjects():
            return [e.subject for e in archive.list("news@doe.test")]

        # Pruned at startup: the old copy is gone; the recent one and the new one stay.
        wait_for(lambda: sorted(subjects()) == ["news", "recent"], timeout=20,
                 what="the archive pruned and the new copy")  # fmt: skip
        with socket.socket() as probe:  # no tracking listener
            assert probe.connect_ex(("127.0.0.1", relay.tracking_port)) != 0
    finally:
        relay.stop()


def start_with(directory, config: str) -> subprocess.CompletedProcess:
    """twistd with only an SMTP listener and ``config``, run until it exits."""
    return run_twistd(directory, f"[server]\ndata_dir = {directory}/data\n[admin]\n"
                      f"enabled = no\n[delivery]\nenabled = no\n[listener:smtp]\n"
                      f"endpoint = tcp:{free_port()}:interface=127.0.0.1\n{config}")  # fmt: skip


def test_busy_tracking_port_and_bad_footer_stop_startup_with_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = start_with(tmp_path, f"[tracking]\nenabled = yes\n"
                            f"endpoint = tcp:{port}:interface=127.0.0.1\n")  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mailrelay: [tracking] endpoint tcp:{port}:interface=127.0.0.1: cannot listen: "
        "Address already in use"]
    result = start_with(tmp_path, "[tracking]\nenabled = yes\nendpoint = tcp:0\n"
                        "[features]\nfooter_html = <a href=$link>stop</a>\n")  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "mailrelay: [features] unknown placeholder $link in the HTML footer template "
        "(known: $url, $recipient)"]
    result = start_with(tmp_path, f"[tracking]\nenabled = yes\nendpoint = tcp:0\n"
                        f"[features]\nfooter_text_file = {tmp_path}/missing.txt\n")  # fmt: skip
    assert result.stderr.strip().splitlines() == [
        f"mailrelay: [features] footer_text_file {tmp_path}/missing.txt: "
        "No such file or directory"]
