"""The README's and docs' pictures, made from the real `make demo` (and `make demo-seg`) models, and the page
driver the browser tests use too (Playwright on Debian's /usr/bin/chromium: `make browser` installs it).

    python -m src.demo.screenshots               # output/demo (+ output/demo_seg): the pictures in assets/
    python -m src.demo.screenshots exp_name=x demo_ui.model_path=output/x/model.onnx

Writes into assets/:
  demo_ui.png, demo_ui_result.png  the demo page as `make demo-ui` serves it (the model it preselects, or
                                   demo_ui.model_path), as it opens and after Detect on two test-split images
                                   (skipped, with a warning, without chromium)
  demo_tracking.png                a frame of the first demo video, tracked (ByteTrack ids, infer.tracker)
  demo_segmentation.png            the `make demo-seg` model (output/demo_seg) on a test image of its data
                                   (skipped, with a warning, when it has not been trained)
  demo_training_curves.png         the experiment's curves.png: losses, validation metrics, learning rate
  pictures.json                    what each picture shows: files, model, thresholds, same-class box pairs
                                   overlapping at IoU > 0.7 in the result pictures (a duplicate the model
                                   should not make; 0 expected)
Run it from the project folder so that the page shows paths relative to it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from loguru import logger

from src.common.config import ROOT, load_config, stage_main
from src.common.draw import save_image_rgb
from src.common.errors import UserError
from src.common.experiment import Experiment, stage_config
from src.common.images import list_images, list_videos, read_image_rgb
from src.common.io import atomic_write_json
from src.common.video import open_video
from src.demo.app import build_app, launch_app, remove_temp_files_at_exit
from src.demo.processing import class_thresholds
from src.dl.artifacts import load_experiment_model
from src.dl.split_samples import load_split_samples
from src.models.postprocess import duplicate_mask
from src.runtime.outputs import draw
from src.runtime.tracking import TrackerSettings, VideoTracks, annotated_frames

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
SEG_EXPERIMENT = "demo_seg"  # `make demo-seg`'s exp_name (Makefile DEMO_SEG)
DUPLICATE_IOU = 0.7


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


def test_images(cfg, count: int) -> list[Path]:
    """The first `count` test-split images with at least one object (the model never trained on them); the
    data folder's first images when there is no test split."""

    samples = [s for s in load_split_samples(cfg, "test") if len(s.labels)]
    if samples:
        return [s.path for s in samples[:count]]
    return list_images(Path(cfg.data_path) / "images")[:count]


def duplicate_pairs(detector, images: Sequence[Path]) -> int:
    """Detections at the model's thresholds that repeat a higher-scoring one of their class (IoU > 0.7)."""

    found = 0
    for dets in detector.predict([read_image_rgb(path) for path in images]):
        found += int(duplicate_mask(dets.boxes, dets.scores, dets.labels, DUPLICATE_IOU).sum())
    return found


def take_screenshots(cfg, out_dir: Path, images: Sequence[Path]) -> list[Path]:
    """demo_ui.png (the page as it opens) and demo_ui_result.png (detections on `images`)."""
    start, result = out_dir / "demo_ui.png", out_dir / "demo_ui_result.png"
    with served_page(cfg) as demo:
        demo.page.screenshot(path=str(start))
        demo.detect(images, "detection(s)")
        demo.settle_gallery()
        demo.page.screenshot(path=str(result), full_page=True)
    return [start, result]


def tracking_frame(cfg, detector, out: Path) -> Path | None:
    """The middle frame of the data's first video, annotated as `make infer infer.track=true` draws it."""

    videos = list_videos(Path(cfg.data_path) / "videos")
    if not videos:
        logger.warning(f"no video in {Path(cfg.data_path) / 'videos'}: no tracking picture")
        return None
    per_class = class_thresholds(detector, None, None)
    thresholds = np.array([per_class[i] for i in range(len(detector.class_names))], np.float32)  # (C,)
    settings = TrackerSettings.from_config(cfg.infer.tracker)
    with (
        open_video(videos[0]) as video,
        VideoTracks(settings, thresholds, detector.class_names, None) as tracks,
    ):
        wanted = max((video.total or 2) // 2, 1)
        picture = None
        for frame in annotated_frames(detector, video.frames(wanted + 1), thresholds, tracks):
            picture = frame.picture
    return save_png(out, picture)


def segmentation_picture(cfg, out: Path, seg_exp_name: str) -> Path | None:
    """The `make demo-seg` model on the first test image of its data, masks under the boxes."""

    overrides = [f"exp_name={seg_exp_name}", f"output_dir={cfg.output_dir}", f"device={cfg.device}"]
    try:
        seg_cfg = stage_config(load_config(overrides))  # data, split and model come from the experiment
        detector = load_experiment_model(seg_cfg)
    except UserError as err:
        logger.warning(f"no segmentation picture ({err}): run `make demo-seg` first")
        return None
    image = read_image_rgb(test_images(seg_cfg, 1)[0])
    return save_png(out, draw(image, detector.predict([image])[0], detector.class_names))


def training_curves(cfg, out: Path) -> Path | None:

    curves = Experiment.of(cfg).file("curves")
    if not curves.exists():
        logger.warning(f"{curves} not found: no training-curves picture")
        return None
    return save_png(out, read_image_rgb(curves))


def save_png(path: Path, image_rgb) -> Path:

    return save_image_rgb(path, image_rgb)


def write_pictures(cfg, out_dir: Path, browser: bool = True, seg_exp_name: str = SEG_EXPERIMENT) -> dict:
    """Every picture of the module docstring into out_dir; returns (and writes as pictures.json) what each
    one shows. browser=False (or no chromium) leaves the two page screenshots out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    detector = load_experiment_model(cfg, cfg.demo_ui.model_path)
    images = test_images(cfg, SCREENSHOT_IMAGES)
    if not images:
        raise UserError(f"no images in {Path(cfg.data_path)}: run `make demo` first")
    record = {
        "model": shown_path(detector.path),
        "thresholds": detector.thresholds().round(4).tolist(),
        "result_images": [shown_path(p) for p in images],
        "same_class_pairs_iou_over_0.7": duplicate_pairs(detector, images),
        "pictures": [],
    }
    pictures = []
    if browser and CHROMIUM.exists():
        pictures += take_screenshots(cfg, out_dir, images)
    elif browser:
        logger.warning(f"{CHROMIUM} not installed (`make browser`): no page screenshots")
    pictures.append(tracking_frame(cfg, detector, out_dir / "demo_tracking.png"))
    pictures.append(segmentation_picture(cfg, out_dir / "demo_segmentation.png", seg_exp_name))
    pictures.append(training_curves(cfg, out_dir / "demo_training_curves.png"))
    record["pictures"] = [p.name for p in pictures if p is not None]
    atomic_write_json(out_dir / "pictures.json", record)
    return record


def shown_path(path) -> str:
    """A path as the pictures' record shows it: relative to the project folder when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def run(cfg) -> dict:

    cfg = stage_config(cfg)
    remove_temp_files_at_exit()
    record = write_pictures(cfg, ROOT / "assets")
    logger.info(f"wrote assets/: {', '.join(record['pictures'])}, pictures.json")
    if record["same_class_pairs_iou_over_0.7"]:
        logger.warning(
            f"{record['same_class_pairs_iou_over_0.7']} detection(s) in the result pictures repeat a box of "
            "their class (IoU > 0.7)"
        )
    return record


main = stage_main(run)

if __name__ == "__main__":
    main()
