"""The report as a reader sees it: the index and every page of the smoke report (06-tuning with its
two smoke pools), and 07-protocol on the smoke protocol profile (its five runs take seconds),
rendered by headless Chromium: every image loaded, no stderr or error block on any page, the code
folded away until the reader opens it, and nothing wider than a 1300-pixel window.

Chromium and its driver are Debian packages (`.ci/run` installs them where missing); outside CI the
test is skipped only when they are absent, and in CI (CI=true) their absence fails it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest

from ssl_lib.report import build as report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
IN_CI = os.environ.get("CI") == "true"

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not IN_CI,
                                reason="headless Chromium and chromedriver not installed")

#: the pages built from the smoke grid (trained once per session); 03-training: the run without
#: unlabeled images (the FixMatch and k-means panels have nothing to draw) and the run without labels
PAGES = ["01-data", "02-augmentation", "03-training-exp1-m0", "03-training-exp1-m50000", "04-ablations",
         "05-conclusions", "06-tuning"]
IMAGES_LOADED = "return Array.from(document.images).map(i => [i.alt || i.src.slice(0, 40), i.complete && i.naturalWidth > 0])"
# every stderr stream (warnings, prints to stderr) and every error, whatever it says
STDERR_BLOCKS = """return Array.from(document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"], .output_error'))
              .map(e => e.innerText.trim().slice(0, 300))"""
CODE_SHOWN = """return Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputArea-editor'))
              .map(e => e.checkVisibility())"""
#: the window a reader is assumed to have
WINDOW = (1300, 900)
# what does not fit the window: the page scrolls sideways, an element reaches past its right edge, or
# an element's content is wider than the element and cut off or scrolled (a table in an output area)
TOO_WIDE = """const width = document.documentElement.clientWidth, out = [];
if (document.documentElement.scrollWidth > width) out.push(`the page: ${document.documentElement.scrollWidth} px`);
for (const e of document.body.querySelectorAll('*')) {
  const box = e.getBoundingClientRect();
  if (!e.checkVisibility() || box.width === 0) continue;
  const cut = getComputedStyle(e).overflowX !== 'visible' && e.scrollWidth > e.clientWidth + 1;
  if (box.right > width + 1 || cut)
    out.push(`${e.tagName.toLowerCase()}.${(e.getAttribute('class') || '').split(' ')[0]} ` +
             `"${(e.textContent || '').trim().slice(0, 40)}": ` +
             `right edge ${Math.round(box.right)}, content ${e.scrollWidth} in ${e.clientWidth} px`);
}
return [window.innerWidth, width, out];"""


@pytest.fixture(scope="module")
def smoke_report(smoke_pages) -> Path:
    return smoke_pages  # the pages, executed once per test run (conftest.py)


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


@pytest.mark.parametrize("page", ["index", *PAGES])
def test_every_image_loads_and_no_stderr_shows(smoke_report, browser, page):
    browser.get((smoke_report / f"{page}.html").as_uri())
    images = browser.execute_script(IMAGES_LOADED)
    assert images and all(ok for _, ok in images), images
    assert browser.execute_script(STDERR_BLOCKS) == []
    body = browser.find_element("tag name", "body").text
    if page == "index":  # figures first: before the first table, and embedded (opens offline)
        html = browser.page_source
        assert html.index("<img") < html.index("<table") and 'src="data:image/png;base64,' in html
        assert len(images) >= 2
    else:  # code cells folded: none shown until opened
        shown = browser.execute_script(CODE_SHOWN)
        assert shown and not any(shown), shown
    if page == "03-training-exp1-m50000":
        assert "No labels: the features cluster the test images" in body
    if page == "03-training-exp1-m0":
        assert "Run exp1-m0-" in body


@pytest.mark.parametrize("page", ["index", *PAGES, "07-protocol"])
def test_no_page_is_wider_than_the_window(request, browser, page):
    folder = (request.getfixturevalue("protocol_smoke_page")[0] if page == "07-protocol"
              else request.getfixturevalue("smoke_report"))
    browser.set_window_size(*WINDOW)
    browser.get((folder / f"{page}.html").as_uri())
    inner, width, too_wide = browser.execute_script(TOO_WIDE)
    assert inner == WINDOW[0] and width > 1200  # measured at the width a reader has (less the scroll bar)
    assert too_wide == [], f"{page} is wider than a {WINDOW[0]}-pixel window: " + "; ".join(too_wide[:5])


def test_a_page_wider_than_the_window_is_seen(browser, tmp_path):
    """The check above can fail: a table of 40 columns in an output area (which scrolls it, cut off at
    the window's edge), as 07-protocol's runs table was."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("table", execution_count=1)
    table = "<table>" + "<tr>" + "<td>a-wide-column</td>" * 40 + "</tr></table>"
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/html": table}, execution_count=1)]
    nb.cells = [nbformat.v4.new_markdown_cell("# a page"), cell]
    nbformat.write(nb, tmp_path / "page.ipynb")
    report.render_html(tmp_path / "page.ipynb", tmp_path / "page.html", "a page")
    browser.set_window_size(*WINDOW)
    browser.get((tmp_path / "page.html").as_uri())
    _, _, too_wide = browser.execute_script(TOO_WIDE)
    assert any(t.startswith("div.jp-RenderedHTMLCommon") and "a-wide-column" in t for t in too_wide), too_wide
    assert any(t.startswith("table.") for t in too_wide), too_wide


def test_the_full_profiles_runs_table_fits_the_window(browser, tmp_path):
    """07-protocol's runs table as the full profile will fill it (29 runs at three label counts,
    hand-made summaries): the label counts and the paper's figures then differ by row."""
    from types import SimpleNamespace

    import numpy as np

    from ssl_lib.experiments import protocol
    from ssl_lib.report import display

    runs = {}
    for (name, seed), cfg in protocol.protocol_grid("full", source={}).items():
        epoch = {"test_acc_raw": [0.9444], "grad_share_kmeans": [0.2345] if cfg.w_kmeans else []}
        runs[(name, seed)] = SimpleNamespace(config=cfg, epoch=lambda c, e=epoch: np.array(e.get(c, []), dtype=float),
                                             summary={"epochs": 1024, "best_acc": 0.9512, "final_acc": 0.9498,
                                                      "median_last20_acc": 0.9501, "data": "torchvision CIFAR-10 (...)"})
    common, per_run = display.split_common(protocol.rows(runs), keep=protocol.PER_RUN_COLUMNS)
    assert "labels" in per_run[0] and "data" in common
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("table", execution_count=1)
    html = display.Table(per_run, common=common, caption="the runs")._repr_html_()
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/html": html}, execution_count=1)]
    nb.cells = [cell]
    nbformat.write(nb, tmp_path / "page.ipynb")
    report.render_html(tmp_path / "page.ipynb", tmp_path / "page.html", "a page")
    browser.set_window_size(*WINDOW)
    browser.get((tmp_path / "page.html").as_uri())
    assert browser.execute_script(TOO_WIDE)[2] == []


def test_code_is_folded_and_opens_on_a_click(smoke_report, browser):
    browser.get((smoke_report / "03-training-exp1-m50000.html").as_uri())
    first = browser.find_element("css selector", "details.ssl-code")
    editor = first.find_element("css selector", ".jp-InputArea-editor")
    assert not editor.is_displayed() and "# Parameters: papermill" not in browser.find_element("tag name", "body").text
    first.find_element("tag name", "summary").click()  # one cell
    assert editor.is_displayed() and "# Parameters: papermill" in editor.text
    assert sum(browser.execute_script(CODE_SHOWN)) == 1
    toggle = browser.find_element("id", "ssl-code-toggle")
    assert toggle.text == "show code"
    toggle.click()  # all of them
    assert all(browser.execute_script(CODE_SHOWN)) and toggle.text == "hide code"
    toggle.click()
    assert not any(browser.execute_script(CODE_SHOWN))


def test_a_stderr_block_is_seen(browser, tmp_path):
    """The check above can fail: a page with a warning on stderr (as Optuna's ExperimentalWarning was)."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("import warnings; warnings.warn('experimental')", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="UserWarning: experimental\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# a page"), cell]
    nbformat.write(nb, tmp_path / "page.ipynb")
    report.render_html(tmp_path / "page.ipynb", tmp_path / "page.html", "a page")
    browser.get((tmp_path / "page.html").as_uri())
    assert browser.execute_script(STDERR_BLOCKS) == ["UserWarning: experimental"]
    assert browser.execute_script(CODE_SHOWN) == [False]
