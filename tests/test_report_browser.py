"""The HTML report opened in a real headless Chromium: no console errors, the plots rendered.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian packages chromium, chromium-driver;
scripts/dev_setup.sh installs them) and selenium (dev extra). It does not skip: a report that
does not render is a failure. The screenshot is saved under artifacts/ at the repository root.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from analysis_study import build_known_study, write_event_log

pytestmark = pytest.mark.browser

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def html_report(tmp_path: pathlib.Path) -> pathlib.Path:
    """A report written by the real CLI on a SQLite study with known tags and an event log."""
    name = f"browser-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    build_known_study(url, name)
    events = write_event_log(tmp_path / "events.jsonl")
    out = tmp_path / "report.html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "optuna_guard.cli",
            "report",
            "--study-name",
            name,
            "--storage",
            url,
            "--format",
            "html",
            "-o",
            str(out),
            "--event-log",
            events,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture()
def chromium(tmp_path: pathlib.Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1400,2600",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_html_report_renders_offline_in_chromium(html_report: pathlib.Path, chromium) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    content = html_report.read_text(encoding="utf-8")
    assert "<script src=" not in content and "<link " not in content  # plotly.js is inlined

    chromium.get(html_report.as_uri())
    WebDriverWait(chromium, 60).until(
        lambda d: (
            d.execute_script(
                "return document.querySelectorAll('.js-plotly-plot .main-svg').length"
            )
            >= 3
        )
    )

    plots = {}
    for div_id in ("plot-memory-vs-params", "plot-timeline", "plot-memory-over-time"):
        element = chromium.find_element(By.ID, div_id)
        svg = element.find_element(By.CSS_SELECTOR, ".main-svg")
        plots[div_id] = (svg.size["width"], svg.size["height"])
        assert svg.size["width"] > 100 and svg.size["height"] > 100, (div_id, svg.size)
    # The plots hold drawn data: scatter points (one per trial with a peak), timeline bars.
    points = chromium.execute_script(
        "return document.querySelectorAll('#plot-memory-vs-params .scatterlayer .point').length"
    )
    assert points >= 14 * 3  # 14 trials with a peak_rss_gb tag, three numeric params
    bars = chromium.execute_script(
        "return document.querySelectorAll('#plot-timeline .barlayer .point').length"
    )
    assert bars == 17  # one bar per trial_started in the event log
    # Self-contained: the page fetched nothing (no CDN, no fonts) while it loaded and drew.
    fetched = chromium.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert fetched == [], fetched
    tables = chromium.find_elements(By.CSS_SELECTOR, "table")
    assert len(tables) >= 5

    height = chromium.execute_script("return document.documentElement.scrollHeight")
    chromium.set_window_size(
        1400, min(int(height) + 300, 6000)
    )  # the whole page in one screenshot
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_browser.png"
    chromium.save_screenshot(str(shot))
    print(f"\nscreenshot of the HTML report: {shot}")
    assert shot.stat().st_size > 10_000

    logs = chromium.get_log("browser")
    errors = [entry for entry in logs if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors
