"""The report as a reader sees it: the index and one training page rendered by headless Chromium,
every image loaded, no error output on the page.

Chromium and its driver are Debian packages (`.ci/run` installs them where missing); outside CI the
test is skipped only when they are absent, and in CI (CI=true) their absence fails it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ssl_lib.report import build as report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
IN_CI = os.environ.get("CI") == "true"

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not IN_CI,
                                reason="headless Chromium and chromedriver not installed")

IMAGES_LOADED = "return Array.from(document.images).map(i => [i.alt || i.src.slice(0, 40), i.complete && i.naturalWidth > 0])"
ERRORS = """return Array.from(document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"], .output_error'))
              .map(e => e.innerText).filter(t => /Error|Traceback/.test(t))"""


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, smoke_grid) -> Path:
    root, _ = smoke_grid  # the smoke runs, trained once per test session
    out = tmp_path_factory.mktemp("browser") / "report"
    report.execute_page("03-training-exp1-m50000", "smoke", out, runs_dir=root, source={})
    report.build_index("smoke", out, runs_dir=root, source={})
    return out


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and DRIVER, "CI must have chromium and chromedriver (.ci/run installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # no driver download: the system's
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.parametrize("page", ["index.html", "03-training-exp1-m50000.html"])
def test_every_image_loads_and_no_error_shows(smoke_report, browser, page):
    browser.get((smoke_report / page).as_uri())
    images = browser.execute_script(IMAGES_LOADED)
    assert images and all(ok for _, ok in images), images
    assert browser.execute_script(ERRORS) == []
    if page == "index.html":  # figures first: before the first table, and embedded (opens offline)
        html = browser.page_source
        assert html.index("<img") < html.index("<table") and 'src="data:image/png;base64,' in html
        assert len(images) >= 2
    else:
        assert "No labels: the features cluster the test images" in browser.find_element("tag name", "body").text
