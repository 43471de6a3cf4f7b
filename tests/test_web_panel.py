"""The web admin page in headless Chromium (Debian's chromium and chromium-driver, driven
by Selenium), tried as a new admin would: log in, add a user, reset its password, see its
statistics, the queue and the suppressions. A screenshot of each page is saved in the
test's tmp dir (and in $MAILRELAY_SCREENSHOTS when set)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from browser import Shots, click, fill, start_browser
from panel import panel_process

from mailrelay.auth.passwords import verify_password
from mailrelay.directory.filedir import UserStore
from mailrelay.features.stats import StatsStore


@pytest.fixture
def panel(tmp_path):
    with panel_process(tmp_path) as info:
        yield info


@pytest.fixture
def browser(tmp_path):
    driver = start_browser(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


def password_hash(info, username: str) -> str:
    store = UserStore(info["user_file"])
    store.load()
    return store.password_hash(username)


def test_admin_session(panel, browser, tmp_path):
    from selenium.webdriver.common.by import By

    shot = Shots(browser, tmp_path / "screenshots")
    url = panel["url"]

    # Not logged in: every page leads to the login form.
    browser.get(url + "/users")
    assert browser.current_url == url + "/login"
    fill(browser, {"name": "alice", "password": "wrong password"})
    click(browser, By.ID, "login")
    assert "Wrong admin name or password" in browser.page_source
    fill(browser, {"name": "alice", "password": panel["admin_password"]})
    shot("01-login")
    click(browser, By.ID, "login")
    assert browser.current_url == url + "/users"
    cookie = browser.get_cookie("mailrelay_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    table = browser.find_element(By.CSS_SELECTOR, "table.users").text
    assert "webapp" in table and "doe.test" in table and "office" in table
    shot("02-users")

    # Add a user; a hostile note comes back as text.
    click(browser, By.LINK_TEXT, "Add an SMTP user")
    fill(browser, {"username": "newsletter", "domains": "shop.test",
                   "addresses": "promo@other.test", "note": "<script>alert(1)</script>",
                   "rate_limit": "250"})  # fmt: skip
    browser.find_element(By.ID, "open_tracking").click()
    shot("03-add-user")
    click(browser, By.ID, "add")
    assert "User added" in browser.title
    first = browser.find_element(By.ID, "password").text
    assert len(first) == 20
    assert verify_password(password_hash(panel, "newsletter"), first)
    assert "confirmation link was mailed to promo@other.test" in browser.page_source
    shot("04-user-added")

    browser.get(url + "/users")
    assert "<script>alert(1)</script>" in browser.find_element(By.CSS_SELECTOR,
                                                               "table.users").text
    assert "<script>alert" not in browser.page_source.replace("&lt;script&gt;", "")

    # Its settings page: change the priority; bad input is shown and changes nothing.
    click(browser, By.LINK_TEXT, "newsletter")
    assert "waiting for confirmation" in browser.page_source
    fill(browser, {"priority": "9"})
    click(browser, By.ID, "save")
    assert "outside 1..5" in browser.page_source
    fill(browser, {"priority": "1"})
    click(browser, By.ID, "save")
    assert "Saved." in browser.page_source
    assert browser.find_element(By.ID, "priority").get_attribute("value") == "1"
    assert browser.find_element(By.ID, "open_tracking").is_selected()
    shot("05-user-settings")

    # Reset the password: shown once, the old one no longer works.
    click(browser, By.XPATH, "//button[text()='Reset password']")
    second = browser.find_element(By.ID, "password").text
    assert second != first and verify_password(password_hash(panel, "newsletter"), second)
    assert not verify_password(password_hash(panel, "newsletter"), first)
    shot("06-new-password")

    # Statistics change as mail is counted.
    browser.get(url + "/users/newsletter/stats")
    assert browser.find_element(By.CSS_SELECTOR, "table.totals").text.count(" 0") >= 3
    store = StatsStore(panel["stats_db"])
    hour = int(time.time() // 3600)
    counts = {}
    for back in range(0, 24 * 20, 7):
        counts[("default", "newsletter", hour - back, "accepted")] = 40 + back % 23
        counts[("default", "newsletter", hour - back, "delivered")] = 36 + back % 19
        counts[("default", "newsletter", hour - back, "bounced")] = back % 5
    store.add(counts)
    store.close()
    browser.refresh()
    totals = browser.find_element(By.CSS_SELECTOR, "table.totals").text
    accepted = sum(v for k, v in counts.items() if k[3] == "accepted")
    assert f"accepted {accepted}" in totals
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline.series-delivered")
    shot("07-user-statistics")
    browser.get(url + "/stats")
    assert "newsletter" in browser.page_source
    shot("08-statistics")

    # The queue holds the confirmation mail; the accounts; the suppressions.
    browser.get(url + "/queue")
    assert "promo@other.test" not in browser.page_source  # recipients are counted, not shown
    assert "1 message(s)" in browser.page_source
    shot("09-queue")
    click(browser, By.CSS_SELECTOR, "table.queue a")
    assert "promo@other.test" in browser.page_source
    shot("10-queued-message")
    browser.get(url + "/accounts")
    shot("11-accounts")
    browser.get(url + "/suppressions")
    fill(browser, {"address": "gone@example.org", "user": "newsletter"})
    click(browser, By.XPATH, "//button[text()='Suppress']")
    assert "Suppressed gone@example.org" in browser.page_source
    shot("12-suppressions")

    # A form posted without the session's CSRF token is refused.
    request = urllib.request.Request(url + "/users/newsletter/delete", data=b"csrf=forged",
                                     headers={"cookie": f"mailrelay_session={cookie['value']}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403

    # Delete the user, log out.
    browser.get(url + "/users/newsletter")
    click(browser, By.XPATH, "//button[text()='Delete user']")
    assert "Deleted user newsletter" in browser.page_source
    click(browser, By.XPATH, "//button[text()='Log out']")
    assert browser.current_url == url + "/login"
    browser.get(url + "/users")
    assert browser.current_url == url + "/login"
