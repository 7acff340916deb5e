"""report.html as a person sees it: opened in headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium), screenshotted, checked that the plots drew, the tables have rows, sorting works.

.ci/run installs Chromium; a developer machine without it skips this test, CI (CI=true) fails it.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest

from bench.report import write_report
from tests.report_data import make_run

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=float)


def test_report_html_renders_plots_and_sortable_tables(browser, tmp_path):
    from selenium.webdriver.common.by import By

    out = make_run(tmp_path / "run")
    write_report(out)
    browser.get((out / "report.html").resolve().as_uri())

    # both plots decoded to real images of the size matplotlib drew, and they are not blank
    for name in ("frontier", "temperature"):
        img = browser.find_element(By.ID, f"plot-{name}")
        w, h = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        assert w > 600 and h > 300, (name, w, h)
        pixels = _png(img.screenshot_as_png)
        assert pixels.std() > 10 and (pixels < 128).mean() > 0.01, name  # lines and text on a white ground

    # the tables: the frontier table has one row per algorithm, the trial list one per trial
    frontier_rows = browser.find_elements(By.CSS_SELECTOR, "h2#frontier + p + table tbody tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in frontier_rows] == ["sft", "dpo", "best-of-n"]
    trial_rows = browser.find_elements(By.CSS_SELECTOR, "h2#trials + p + table tbody tr")
    assert len(trial_rows) == 3 * 4 + 1

    # clicking a numeric header sorts by value (descending on the second click)
    table = browser.find_element(By.CSS_SELECTOR, "h2#frontier + p + table")
    header = table.find_elements(By.TAG_NAME, "th")[2]  # best gold, KL <= 1
    header.click()
    header.click()
    firsts = [r.find_element(By.TAG_NAME, "td").text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert firsts == ["dpo", "best-of-n", "sft"]  # 0.71 > 0.67 > 0.50
    header.click()
    firsts = [r.find_element(By.TAG_NAME, "td").text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert firsts == ["sft", "best-of-n", "dpo"]

    # the whole page as a person sees it (kept in the test's tmp dir for a look)
    shot = tmp_path / "report-page.png"
    browser.save_screenshot(str(shot))
    assert _png(shot.read_bytes()).std() > 10
