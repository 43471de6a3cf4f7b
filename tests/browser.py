"""Headless Chromium for tests: Debian's chromium and chromium-driver driven by Selenium
(no browser is downloaded), and small helpers to fill forms, click and take screenshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HAVE_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
NO_BROWSER = "Debian's chromium and chromium-driver are not installed (./test.sh installs them)"


def start_browser(profile: Path):
    # A test that needs the browser fails without it: a skipped test is a failing feature.
    assert HAVE_BROWSER, NO_BROWSER
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


class Shots:
    def __init__(self, driver, directory: Path) -> None:
        self.driver = driver
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.extra = os.environ.get("MAILRELAY_SCREENSHOTS")

    def __call__(self, name: str) -> None:
        # The whole page, not just the window: size the window to the document first.
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, max(700, min(height + 40, 4000)))
        path = self.directory / f"{name}.png"
        self.driver.save_screenshot(str(path))
        if self.extra:
            os.makedirs(self.extra, exist_ok=True)
            shutil.copy(path, os.path.join(self.extra, f"{name}.png"))


def fill(driver, values: dict[str, str]) -> None:
    from selenium.webdriver.common.by import By

    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)


def click(driver, by, what) -> None:
    """Click a link or a submit button and wait for the next page to load."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(by, what).click()

    def loaded(driver) -> bool:
        try:
            old.is_enabled()
        except StaleElementReferenceException:
            return driver.execute_script("return document.readyState") == "complete"
        return False

    # While the page is being replaced Chromium may answer any command with an error
    # ("unhandled inspector error: cannot find context"), not only a stale element: ask again.
    WebDriverWait(driver, 20, ignored_exceptions=(WebDriverException,)).until(loaded)


