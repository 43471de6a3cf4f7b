"""End to end through the real twistd process: the control panel on its [admin] listener.

A new admin logs in with headless Chromium, adds an SMTP user, sends a message with it
through smtplib and sees the statistics change; a sender added through the API is refused
at MAIL FROM until its confirmation link (mailed through the relay's own queue) is
followed over HTTP. An admin deleted or given a new password with mailrelay-admin is
logged out of every open session, over plain HTTP and in the browser.
"""

from __future__ import annotations

import http.client
import json
import re
import smtplib
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest
from browser import click, fill, start_browser
from harness import Relay, free_port, message, wait_for

PASSWORD = "correct horse battery"
ADMIN_PASSWORD = "admin-password-1"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    port = free_port()
    r = Relay(tmp_path_factory.mktemp("panel"), config=(
        f"[admin]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
        f"public_url = http://127.0.0.1:{port}\n\n[delivery]\nenabled = no\n\n"
        "[policy]\nlogin_delay_after = 2\nlogin_block_after = 2\n"))  # fmt: skip
    r.panel_url = f"http://127.0.0.1:{port}"
    r.admin("account", "set", "default", "--domains", "doe.test;shop.test")
    r.add_user("doe.test", PASSWORD)  # added with mailrelay-admin: verified implicitly
    r.api_key = r.admin("apikey", "add", "e2e", "--read-write").stdout.splitlines()[1]
    r.admin("admin", "add", "alice", "--password-stdin", input=ADMIN_PASSWORD + "\n")
    r.start()

    def panel_up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(panel_up, what="the control panel")
    yield r
    r.stop()


def api(relay, method, path, doc=None):
    request = urllib.request.Request(
        relay.panel_url + "/api/v1" + path, method=method,
        data=json.dumps(doc).encode() if doc is not None else None,
        headers={"authorization": f"Bearer {relay.api_key}", "content-type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def send(relay, login, sender, to="someone@example.net"):
    with relay.smtp(login=login) as client:
        client.sendmail(sender, [to], message(sender, to))


def test_unverified_sender_refused_until_confirmed(relay):
    code, created = api(relay, "POST", "/users", {"username": "mailer",
                                                  "addresses": "sales@shop.test"})
    assert code == 201, created
    assert created["user"]["unverified"] == ["sales@shop.test"]
    login = ("mailer", created["password"])
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(relay, login, "sales@shop.test")
    assert refused.value.smtp_code == 550
    assert b"5.7.1" in refused.value.smtp_error and b"not verified" in refused.value.smtp_error

    queue_id = created["verification"][0]["queue_id"]
    text = next(p for p in relay.spool_files("queue") if p.name == queue_id).read_text()
    url = re.search(r"http://\S+/verify/\S+", text).group(0)
    with urllib.request.urlopen(url, timeout=30) as page:
        assert b"Confirm" in page.read()
    with urllib.request.urlopen(urllib.request.Request(url, data=b""), timeout=30) as page:
        assert b"is confirmed" in page.read()

    def accepted():
        try:
            send(relay, login, "sales@shop.test")
            return True
        except smtplib.SMTPSenderRefused:
            return False

    wait_for(accepted, timeout=10, interval=0.5, what="the confirmed sender accepted")


def test_admin_adds_a_user_sends_and_sees_statistics(relay, browser):
    from selenium.webdriver.common.by import By

    url = relay.panel_url
    browser.get(url + "/login")
    fill(browser, {"name": "alice", "password": ADMIN_PASSWORD})
    click(browser, By.ID, "login")
    click(browser, By.LINK_TEXT, "Add an SMTP user")
    fill(browser, {"username": "app", "domains": "doe.test", "note": "web shop"})
    click(browser, By.ID, "add")
    password = browser.find_element(By.ID, "password").text

    send(relay, ("app", password), "shop@doe.test")
    send(relay, ("app", password), "shop@doe.test")

    def counted():
        browser.get(url + "/users/app/stats")
        return "accepted 2" in browser.find_element(By.CSS_SELECTOR, "table.totals").text

    wait_for(counted, timeout=20, interval=0.5, what="the statistics of app")
    click(browser, By.XPATH, "//button[text()='Log out']")


class PanelClient:
    """A web admin session over plain HTTP: the login form's CSRF token, the cookie."""

    def __init__(self, url: str, source: str = "127.0.0.1") -> None:
        self.port = urllib.parse.urlsplit(url).port
        self.source = source  # the client's address (any of 127.0.0.0/8)
        self.cookie = ""

    def request(self, method: str, path: str, form: dict | None = None):
        """(status, location, body text); a new session cookie is kept."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30,
                                                source_address=(self.source, 0))
        try:
            headers = {"cookie": self.cookie} if self.cookie else {}
            body = None
            if form is not None:
                body = urllib.parse.urlencode(form)
                headers["content-type"] = "application/x-www-form-urlencoded"
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            text = response.read().decode()
            cookie = response.getheader("set-cookie")
            if cookie:
                self.cookie = cookie.split(";", 1)[0]
            return response.status, response.getheader("location"), text
        finally:
            connection.close()

    def try_login(self, name: str, password: str):
        """(status, location, body text) of posting the login form."""
        _, _, form = self.request("GET", "/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
        return self.request("POST", "/login", {"name": name, "password": password,
                                               "csrf": csrf})  # fmt: skip

    def login(self, name: str, password: str) -> None:
        status, location, _ = self.try_login(name, password)
        assert (status, location) == (303, "/users")

    def csrf(self) -> str:
        status, _, page = self.request("GET", "/users")
        assert status == 200
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_changed_or_deleted_admin_is_logged_out_over_http(relay):
    relay.admin("admin", "add", "bob", "--password-stdin", input="bob-password-1\n")
    relay.admin("admin", "add", "carol", "--password-stdin", input="carol-password-1\n")
    bobs = [PanelClient(relay.panel_url) for _ in range(2)]
    for client in bobs:
        client.login("bob", "bob-password-1")
    carol = PanelClient(relay.panel_url)
    carol.login("carol", "carol-password-1")
    csrf = bobs[1].csrf()

    relay.admin("admin", "passwd", "bob", "--password-stdin", input="bob-password-2\n")
    wait_for(lambda: bobs[0].request("GET", "/users")[:2] == (303, "/login"), timeout=10,
             interval=0.2, what="bob's old session to end")  # fmt: skip
    # Every session of bob ended, a form posted with the old cookie included.
    status, _, page = bobs[1].request("POST", "/accounts", {"csrf": csrf, "name": "x"})
    assert status == 403 and "your session has ended" in page
    assert bobs[1].request("GET", "/users")[:2] == (303, "/login")
    assert carol.request("GET", "/users")[0] == 200  # another admin is not affected
    fresh = PanelClient(relay.panel_url)
    fresh.login("bob", "bob-password-2")
    assert fresh.request("GET", "/users")[0] == 200

    relay.admin("admin", "del", "carol")
    wait_for(lambda: carol.request("GET", "/users")[:2] == (303, "/login"), timeout=10,
             interval=0.2, what="carol's session to end")  # fmt: skip
    assert fresh.request("GET", "/users")[0] == 200


def test_failed_smtp_logins_block_the_web_login_from_that_address(relay):
    """One brute-force defence for the relay: [policy] login_block_after failures at AUTH
    from an address also refuse its web logins, however right the password."""
    for _ in range(2):
        client = smtplib.SMTP_SSL("127.0.0.1", relay.smtps_port, local_hostname="client.test",
                                  context=relay.tls_context(), timeout=30,
                                  source_address=("127.0.0.9", 0))  # fmt: skip
        client.ehlo()
        client.user, client.password = "doe.test", "wrong password"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("PLAIN", client.auth_plain)
        assert refused.value.smtp_code == 535
        client.close()
    status, _, page = PanelClient(relay.panel_url, source="127.0.0.9").try_login(
        "alice", ADMIN_PASSWORD)
    assert status == 429 and "Too many failed logins: wait a few minutes." in page
    PanelClient(relay.panel_url).login("alice", ADMIN_PASSWORD)  # other addresses may


def test_browser_of_an_admin_given_a_new_password_is_logged_out(relay, browser):
    from selenium.webdriver.common.by import By

    relay.admin("admin", "add", "dave", "--password-stdin", input="dave-password-1\n")
    browser.get(relay.panel_url + "/login")
    fill(browser, {"name": "dave", "password": "dave-password-1"})
    click(browser, By.ID, "login")
    assert browser.current_url == relay.panel_url + "/users"

    relay.admin("admin", "passwd", "dave", "--password-stdin", input="dave-password-2\n")

    def logged_out():
        browser.get(relay.panel_url + "/users")
        return browser.current_url == relay.panel_url + "/login"

    wait_for(logged_out, timeout=10, interval=0.2, what="the browser's session to end")
    fill(browser, {"name": "dave", "password": "dave-password-1"})
    click(browser, By.ID, "login")
    assert "Wrong admin name or password" in browser.page_source
    fill(browser, {"name": "dave", "password": "dave-password-2"})
    click(browser, By.ID, "login")
    assert browser.current_url == relay.panel_url + "/users"


@pytest.fixture
def browser(tmp_path):
    driver = start_browser(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()
