"""`sdxl-batch report` end to end, looked at in a real browser: a tiny job through the CLI, its
report through the CLI, then the page opened from disk in Debian's headless Chromium (selenium)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import prompt_rows, run_cli, write_config, write_manifest

pytestmark = pytest.mark.integration

ROWS = 8
WIDTH = 1280
SECTIONS = ["Summary", "Runs", "Throughput over time", "Per actor", "Stage breakdown", "Sample images"]
CHROME_ARGUMENTS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={WIDTH},2000",
    "--hide-scrollbars",  # the page keeps its full width in the screenshot
)  # fmt: skip


def _browser() -> tuple[str, str]:
    """Chromium and its driver, or a skip (a failure on CI, where they must be installed)."""
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "headless Chromium or chromedriver is not installed (`make browser` installs Debian's packages)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass(frozen=True)
class RenderedPage:
    """What the browser made of the report."""

    title: str
    headings: list[str]
    images: list[dict[str, Any]]  # per <img>: complete, naturalWidth, the section it is in
    resources: list[str]  # everything the page fetched (Resource Timing)
    console: list[dict[str, Any]]
    screenshot: Image.Image  # the whole page
    plot: tuple[int, int, int, int]  # the throughput plot's box on the screenshot


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """A real 8-row job (embedded Ray, the tiny model) and its report, both through the CLI."""
    folder = tmp_path_factory.mktemp("report-browser")
    manifest = write_manifest(folder / "m.parquet", prompt_rows(ROWS))
    output = folder / "out"
    config = write_config(
        folder / "job.yaml", manifest=str(manifest), output=str(output),
        model={"preset": "tiny", "cache_dir": str(model_cache)}, generation={"batch_size": 4},
        write={"rows_per_part": 4}, resources={"actors": 1},
    )  # fmt: skip
    run = run_cli("run", str(config), "--no-progress")
    assert run.returncode == 0, run.stderr
    made = run_cli("report", str(output))
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == f"Report: {output / 'report.html'}"
    return output / "report.html"


@pytest.fixture(scope="module")
def page(report: Path) -> Iterator[RenderedPage]:
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in CHROME_ARGUMENTS:
        options.add_argument(argument)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        driver.get(report.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({complete: i.complete, naturalWidth: i.naturalWidth,"
            " section: i.closest('section') ? i.closest('section').id : null}));"
        )
        box = driver.execute_script(
            "const r = document.querySelector('#throughput svg').getBoundingClientRect();"
            "const x = window.scrollX, y = window.scrollY;"
            "return [r.left + x, r.top + y, r.right + x, r.bottom + y];"
        )
        size = driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];"
        )
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True,
             "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}},
        )  # fmt: skip
        yield RenderedPage(
            title=driver.title,
            headings=[h.text for h in driver.find_elements("tag name", "h2")],
            images=images,
            resources=driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);"),
            console=driver.get_log("browser"),
            screenshot=Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB"),
            plot=(int(box[0]), int(box[1]), int(box[2]), int(box[3])),
        )
    finally:
        driver.quit()


def test_page_renders_every_section(page: RenderedPage, report: Path) -> None:
    assert page.title == f"sdxl-batch report: {report.parent}"
    assert page.headings == SECTIONS


def test_every_image_loads_and_the_sheet_shows_every_row(page: RenderedPage) -> None:
    assert page.images and all(image["complete"] and image["naturalWidth"] > 0 for image in page.images)
    assert sum(image["section"] == "samples" for image in page.images) == ROWS
    assert page.resources == []  # self-contained: the page fetched nothing


def test_no_console_errors(page: RenderedPage) -> None:
    assert [entry for entry in page.console if entry["level"] == "SEVERE"] == []


def test_screenshot_is_a_rendered_page(page: RenderedPage, tmp_path: Path) -> None:
    page.screenshot.save(tmp_path / "report.png")  # kept with the test's files, to look at
    width, height = page.screenshot.size
    assert width == WIDTH and height > 2000  # summary, three plots and the contact sheet
    pixels = np.asarray(page.screenshot)
    assert pixels.std() > 20
    colours = page.screenshot.getcolors(maxcolors=1 << 24) or []
    assert len(colours) > 1000  # text, plots and thumbnails: not a blank or one-colour page
    left, top, right, bottom = page.plot
    assert right - left > 800 and bottom - top > 150
    plot = pixels[top:bottom, left:right]
    assert (plot.min(axis=2) < 200).mean() > 0.03  # lines, bars and labels drawn in the plot area
