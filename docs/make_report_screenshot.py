"""Regenerate `docs/report.png`: a screenshot of the demo job's HTML report in headless Chromium.

    .venv/bin/python docs/make_report_screenshot.py            # runs the demo into a temp dir first
    .venv/bin/python docs/make_report_screenshot.py OUTPUT     # the report of an existing output

Needs Debian's `chromium` and `chromium-driver` (`make browser`) and selenium (a dev dependency).
The page is captured 1280 px wide, its first 1800 px, and saved as an optimised PNG.
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("sdxl-batch"))
WIDTH, HEIGHT = 1280, 1800
MAX_BYTES = 400_000


def chrome_options() -> list[str]:
    """Headless Chromium as a sandboxed test browser: no GPU, no network side traffic."""
    return [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars",
    ]  # fmt: skip


def capture(html: Path, *, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """The top `height` pixels of the page at `html`, rendered `width` pixels wide."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in chrome_options():
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        driver.get(html.resolve().as_uri())
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True,
             "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
        )  # fmt: skip
    finally:
        driver.quit()
    return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")


def save_small_png(image: Image.Image, path: Path, *, max_bytes: int = MAX_BYTES) -> int:
    """Save as an optimised PNG; fall back to a 256-colour palette when that is too large (the
    demo's random-weight images are noise, which full-colour PNG cannot compress)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > max_bytes:
        buffer = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buffer, format="PNG", optimize=True
        )
    path.write_bytes(buffer.getvalue())
    return buffer.tell()


def demo_output(folder: Path) -> Path:
    """Run the demo job (tiny model, 24 rows, local Ray) into `folder`/outputs/demo, and its report
    from `folder`, so the page names the output as `make demo` does: outputs/demo."""
    output = folder / "outputs" / "demo"
    subprocess.run([CLI, "run", "configs/demo.yaml", "--output", str(output), "--no-progress"], cwd=REPO, check=True)
    subprocess.run([CLI, "report", "outputs/demo"], cwd=folder, check=True)
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", help="an output whose report.html exists (default: run the demo)")
    parser.add_argument("--png", default=str(REPO / "docs" / "report.png"), help="where the screenshot goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdxl-batch-report-") as folder:
        output = Path(args.output) if args.output else demo_output(Path(folder))
        size = save_small_png(capture(output / "report.html"), Path(args.png))
    print(f"{args.png}: {WIDTH}x{HEIGHT}, {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
