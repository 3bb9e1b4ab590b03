"""The README's demo pictures, taken from the real page in a headless browser, and the page driver the
browser tests use too (Playwright on Debian's /usr/bin/chromium: `make browser` installs it).

    python -m src.demo.screenshots               # the `make demo` model (output/demo): assets/demo_ui*.png
    python -m src.demo.screenshots exp_name=x demo_ui.model_path=output/x/model.onnx

Serves the demo as `make demo-ui` would (the model the page preselects, or demo_ui.model_path), uploads the
first two images of data_path/images and writes assets/demo_ui.png (the page as it opens) and
assets/demo_ui_result.png (after Detect). Run it from the project folder so that the page shows paths
relative to it. Not run by the tests (it needs a trained model); they drive the page with `DemoPage`.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from src.common.config import ROOT, stage_main
from src.common.errors import UserError
from src.common.experiment import stage_config
from src.common.images import list_images
from src.demo.app import build_app, launch_app, remove_temp_files_at_exit

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1360, "height": 900}
SCREENSHOT_IMAGES = 2  # uploads shown in demo_ui_result.png


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DemoPage:
    """A Playwright page on the demo: upload files, press Detect, wait for the result."""

    def __init__(self, page, url: str):
        self.page, self.url = page, url
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#detect")

    def wait_for_text(self, selector: str, text: str) -> None:
        self.page.wait_for_function(
            "([selector, text]) => document.querySelector(selector).innerText.includes(text)",
            arg=[selector, text],
        )

    def status(self) -> str:
        return self.page.locator("#status textarea").input_value()

    def set_conf(self, value: float) -> None:
        """The slider's number box (Gradio applies it on Enter)."""
        box = self.page.locator("#conf input[type=number]")
        box.fill(str(value))
        box.press("Enter")
        self.page.wait_for_function(
            "v => Number(document.querySelector('#conf input[type=range]').value) === v", arg=float(value)
        )

    def set_tracking(self, on: bool) -> None:
        self.page.locator("#track input[type=checkbox]").set_checked(on)

    def detect(self, files: Sequence[Path], expect: str) -> str:
        """Upload `files` (replacing earlier ones), press Detect, wait until the status holds `expect`."""
        clear = self.page.locator("#upload button[aria-label='Clear']")
        if clear.count():
            clear.first.click()
        self.page.locator("#upload input[type=file]").set_input_files([str(f) for f in files])
        for file in files:  # uploaded: the file list shows its name
            self.wait_for_text("#upload", file.stem)
        before = self.status()
        self.page.click("#detect")
        self.page.wait_for_function(
            "([text, before]) => { const v = document.querySelector('#status textarea').value;"
            " return v.includes(text) && v !== before; }",
            arg=[expect, before],
        )
        return self.status()

    def settle_gallery(self) -> None:
        """Wait until every gallery picture is loaded and the layout has settled (for a screenshot)."""
        self.page.locator("#gallery img").first.wait_for()
        self.page.wait_for_function(
            "() => [...document.querySelectorAll('#gallery img')].every(i => i.complete)"
        )
        self.page.wait_for_timeout(1000)


@contextmanager
def served_page(cfg, app=None) -> Iterator[DemoPage]:
    """The demo of `cfg` served on a free local port and opened in headless Chromium; closed afterwards."""
    from playwright.sync_api import sync_playwright


    if not CHROMIUM.exists():
        raise UserError(f"{CHROMIUM} is not installed: run `make browser` (Debian's chromium)")
    demo = build_app(cfg, app)
    url = launch_app(demo, cfg, block=False, port=free_port())
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                yield DemoPage(browser.new_page(viewport=VIEWPORT), url)
            finally:
                browser.close()
    finally:
        demo.close()


def take_screenshots(cfg, out_dir: Path) -> list[Path]:
    """assets/demo_ui.png (the page as it opens) and demo_ui_result.png (detections on demo images)."""
    images = list_images(Path(cfg.data_path) / "images")[:SCREENSHOT_IMAGES]
    if not images:
        raise UserError(f"no images in {Path(cfg.data_path) / 'images'}: run `make demo` first")
    start, result = out_dir / "demo_ui.png", out_dir / "demo_ui_result.png"
    with served_page(cfg) as demo:
        demo.page.screenshot(path=str(start))
        demo.detect(images, "detection(s)")
        demo.settle_gallery()
        demo.page.screenshot(path=str(result), full_page=True)
    return [start, result]


def run(cfg) -> list[Path]:

    cfg = stage_config(cfg)
    remove_temp_files_at_exit()
    shots = take_screenshots(cfg, ROOT / "assets")
    logger.info(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in shots)}")
    return shots


main = stage_main(run)

if __name__ == "__main__":
    main()
