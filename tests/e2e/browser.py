"""Headless Chromium for the dashboard tests: Debian's ``chromium`` driven by its own
``chromedriver`` through Selenium, which is pointed at both binaries so Selenium Manager
never downloads anything.

The browser resolves no host name but 127.0.0.1 (``--host-resolver-rules``), so a page
that reached for a CDN would fail to load it: what renders, renders offline.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)"
    return None  # a missing chromedriver beside it is an error, not a skip


def start(profile: Path, downloads: Path, log: Path) -> webdriver.Chrome:
    """A fresh browser with its own profile directory; downloads land in ``downloads``."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    return driver


def stop(driver: webdriver.Chrome) -> None:
    """Quit the browser and its driver; kill the driver if quitting fails."""
    try:
        driver.quit()
    except WebDriverException:
        proc = driver.service.process
        if proc is not None and proc.poll() is None:
            proc.kill()


def wait_until(driver, condition, what: str, timeout: float = 180.0):
    """Poll ``condition(driver)`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition(driver)
        except WebDriverException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def artifacts_dir(tmp_path_factory) -> Path:
    """Where screenshots go: $POSTTRAIN_TEST_ARTIFACTS if set, else a pytest temp dir."""
    named = os.environ.get("POSTTRAIN_TEST_ARTIFACTS")
    if named:
        path = Path(named)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")


def screenshot(driver, directory: Path, name: str) -> Path:
    """The whole page as a PNG (the window grown to the page's height first)."""
    height = driver.execute_script(
        "window.scrollTo(0, 0); return document.documentElement.scrollHeight"
    )
    driver.set_window_size(1400, max(1000, min(int(height) + 40, 6000)))
    path = directory / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, (path, len(data))
    driver.set_window_size(1400, 1000)
    return path
