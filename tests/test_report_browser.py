"""report.html in a real headless browser (Debian's chromium driven by playwright): it loads from
disk with no console errors, every image and video resolves, and the metrics table sorts on click.
With DSD_REPORT_SCREENSHOT=<path.png> it saves a screenshot of the page (for the README)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is absent (pip install playwright)")

from test_evaluate import evaluate, make_3d_sweep  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, path: Path):
    """The page at `path` (a laptop-sized viewport) and the console errors it raised."""
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, errors


def assert_media_resolve(page) -> None:
    images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 60), i.complete, i.naturalWidth])")
    assert images and all(complete and width > 0 for _, complete, width in images), images
    # every video has decoded its first frame (HAVE_CURRENT_DATA) without a media error
    page.wait_for_function("Array.from(document.querySelectorAll('video')).every(v => v.readyState >= 2 || v.error)",
                           timeout=10_000)
    videos = page.evaluate("Array.from(document.querySelectorAll('video')).map(v => [v.readyState, v.error && v.error.code, v.videoWidth, v.loop])")
    assert videos and all(state >= 2 and error is None and width > 0 and loop for state, error, width, loop in videos), videos


def column_values(page, column: int) -> list[str]:
    return page.evaluate(f"Array.from(document.querySelector('table.metrics').tBodies[0].rows)"
                         f".map(r => r.cells[{column}].dataset.v)")


def test_report_loads_resolves_media_and_sorts(browser, tmp_path):
    sweep = make_3d_sweep(tmp_path / "sweep")
    evaluate(sweep, "--cache", tmp_path / "cache")
    page, errors = open_page(browser, sweep / "report.html")
    assert_media_resolve(page)
    headers = page.evaluate("Array.from(document.querySelectorAll('table.metrics thead th')).map(h => h.textContent)")
    for name in ("Vendi (pixels)", "method"):
        column = headers.index(name)
        header = page.locator("table.metrics thead th").nth(column)
        values = column_values(page, column)
        numeric = name != "method"
        key = float if numeric else str
        header.click()
        assert column_values(page, column) == sorted(values, key=key)
        header.click()
        assert column_values(page, column) == sorted(values, key=key, reverse=True)
    # the metric differs between the two runs, so the sort above was not a no-op
    assert len(set(column_values(page, headers.index("Vendi (pixels)")))) == 2
    assert errors == []
    if os.environ.get("DSD_REPORT_SCREENSHOT"):
        page.screenshot(path=os.environ["DSD_REPORT_SCREENSHOT"], full_page=True)
    page.close()
    # the inline page resolves everything with no file beside it
    evaluate(sweep, "--cache", tmp_path / "cache", "--inline", "--out", tmp_path / "inline")
    page, errors = open_page(browser, tmp_path / "inline" / "report.html")
    assert_media_resolve(page)
    assert errors == []
    page.close()


def test_numeric_columns_sort_as_numbers(browser, tmp_path):
    """Values whose text order differs from their numeric order (9.5 < 10.2 < 100; empty last)."""
    from dsd.report import write_report

    columns = ["method", "prompt", "seeds", "fid"]
    rows = [{"method": m, "prompt": "p", "seeds": 2, "fid": v} for m, v in (("a", 100.0), ("b", 9.5), ("c", None), ("d", 10.2))]
    write_report(tmp_path, [], columns, rows + [{"method": "a", "prompt": "mean", "seeds": 2, "fid": 1.0, "mean_row": True}])
    page, errors = open_page(browser, tmp_path / "report.html")
    page.locator("table.metrics thead th").nth(3).click()
    assert column_values(page, 0) == ["b", "d", "a", "c"]
    page.locator("table.metrics thead th").nth(3).click()
    assert column_values(page, 0) == ["a", "d", "b", "c"]
    assert page.evaluate("document.querySelector('table.metrics').tBodies[1].rows.length") == 1  # means stay apart
    assert errors == []
    page.close()
