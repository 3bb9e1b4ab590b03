"""A local web demo: pick a model, upload images or a video, see and download what it detects.

    make demo-ui                      # or: python -m src.demo.app [demo_ui.port=7861 demo_ui.model_path=...]

Any artifact runs (best.pt / model.onnx / model_fp32.xml / .engine, through src.runtime.load_model): the
list offers every artifact found in the experiment folders under output_dir, and a path can be typed in.
The confidence slider starts at the model's own threshold (thresholds.json / the artifact's metadata; its
per-class thresholds apply while the slider stays there). Results: annotated images (or an annotated
video), a table of detections, and downloads (annotated files, predictions.json, YOLO txt labels, one zip).

Served on 127.0.0.1 only by default, with Gradio's analytics off, an upload size limit and a bounded queue.
A file that cannot be read gets a message in the page, never a crash. Videos are processed frame by frame
(memory stays bounded) up to demo_ui.max_video_frames / max_video_seconds.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.draw import draw_detections, save_image_rgb
from src.common.errors import ExperimentError
from src.common.experiment import ARTIFACTS, Experiment, stage_config
from src.common.images import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    ImageReadError,
    is_image,
    is_video,
    list_images,
    list_videos,
    read_image_rgb,
)
from src.common.io import atomic_write, atomic_write_json
from src.common.video import VideoOutput, VideoReadError, open_video
from src.dl.infer import WRITABLE_EXTS, yolo_text
from src.runtime import Detections, Detector, best_artifact, load_model
from src.runtime.slicing import sliced_if_configured

TABLE_COLUMNS = ["file", "frame", "class_id", "class_name", "score", "x1", "y1", "x2", "y2"]
MAX_TABLE_ROWS = 2000  # rows shown in the page; the downloads hold every detection
PREVIEW_FOURCC = "VP80"  # browsers play VP8 WebM; OpenCV's wheels have no H.264 encoder
DOWNLOAD_FOURCC = "mp4v"  # the annotated .mp4 offered for download (same as src.dl.infer)


# ---------------------------------------------------------------- models


def find_models(output_dir: str | Path) -> list[Path]:
    """Every artifact (src.common.experiment.ARTIFACTS) in the experiment folders directly under output_dir, sorted."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += [folder / name for name in ARTIFACTS.values() if (folder / name).is_file()]
    return found


def model_choices(output_dir: str | Path) -> list[tuple[str, str]]:
    """(label, path) pairs for the model list: "experiment/file"."""
    return [(f"{p.parent.name}/{p.name}", str(p)) for p in find_models(output_dir)]


def default_model(cfg: DictConfig) -> str | None:
    """demo_ui.model_path, else the fastest artifact of exp_name for `device`, else the first one found."""
    if cfg.demo_ui.model_path:
        return str(cfg.demo_ui.model_path)
    try:
        return str(best_artifact(Experiment.of(cfg).root, str(cfg.device)))
    except ExperimentError as err:  # a stale export: say so, offer another model
        logger.warning(str(err))
        models = find_models(cfg.output_dir)
        return str(models[0]) if models else None
    except FileNotFoundError:
        models = find_models(cfg.output_dir)
        return str(models[0]) if models else None


class ModelCache:
    """Loaded Detectors by path; keeps the `size` most recently used (each holds a whole model)."""

    def __init__(
        self,
        device: str = "auto",
        precision: str | None = None,
        size: int = 1,
        wrap=lambda detector: detector,
    ):
        self.device, self.precision, self.size = device, precision, max(1, size)
        self.wrap = wrap  # e.g. sliced inference (src/runtime/slicing.py)
        self._models: dict[str, Detector] = {}
        self._lock = threading.Lock()

    def get(self, path: str | Path) -> Detector:
        key = str(Path(path).expanduser())
        with self._lock:
            if key in self._models:
                self._models[key] = self._models.pop(key)  # most recently used goes last
                return self._models[key]
            detector = self.wrap(load_model(key, device=self.device, precision=self.precision))
            logger.info(f"demo: loaded {detector}")
            self._models[key] = detector
            while len(self._models) > self.size:
                self._models.pop(next(iter(self._models)))
            return detector


def describe_model(detector: Detector) -> str:
    """Markdown: backend, file, input size, classes, default thresholds."""
    meta = detector.meta
    h, w = meta.img_size
    path = Path(str(detector.path)).absolute()
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    text = (
        f"**{detector.backend}** `{shown}` · input {w}×{h} · {meta.num_classes} classes · "
        f"default threshold {meta.conf_thresh:.3g}"
    )
    if meta.class_thresholds:
        per_class = ", ".join(f"{name} {value:.3g}" for name, value in meta.class_thresholds.items())
        text += f" (per class: {per_class}; used while the slider stays at the default)"
    return text


def slider_conf(detector: Detector, value: float | None, step: float = 0.01) -> float | None:
    """The slider's value as a `conf`: at the model's default (within half a step) -> None, i.e. the
    model's own global + per-class thresholds; anywhere else -> one threshold for every class."""
    if value is None or abs(float(value) - detector.meta.conf_thresh) <= step / 2 + 1e-9:
        return None
    return float(value)


def class_thresholds(
    detector: Detector, conf: float | dict | None = None, classes: Sequence[str] | None = None
) -> dict[int, float]:
    """Per-class thresholds {class id: value} for `conf`; classes left out of `classes` get +inf (hidden).

    classes None: every class. Names the model does not have are ignored.
    """
    thresholds = detector.thresholds(conf)
    wanted = None if classes is None else set(map(str, classes))
    return {
        i: (float(thresholds[i]) if wanted is None or name in wanted else float("inf"))
        for i, name in enumerate(detector.class_names)
    }


# ---------------------------------------------------------------- images


@dataclass
class Results:
    """What one request produced: gallery (annotated image path, caption) pairs or the annotated video,
    the detections table, files to download, and messages about inputs that could not be used."""

    gallery: list[tuple[str, str]] = field(default_factory=list)
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TABLE_COLUMNS))
    downloads: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    video: str | None = None  # browser-playable annotated preview (WebM)
    detections: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. "video cut at 300 frames"

    def __iter__(self) -> Iterator[Any]:
        """`gallery, table, downloads = predict_images(...)` (problems: `.problems`)."""
        return iter((self.gallery, self.table, self.downloads))


def file_path(item: Any) -> Path:
    """A Gradio upload (a path string, or an object with .name / .path) as a Path."""
    if isinstance(item, (str, Path)):
        return Path(item)
    for attribute in ("path", "name"):
        value = getattr(item, attribute, None)
        if isinstance(value, str):
            return Path(value)
    raise TypeError(f"not a file: {item!r}")


def unique_stem(name: str, used: set[str]) -> str:
    """`name`, or name_2, name_3... when two uploads share a file name."""
    stem, n = name, 1
    while stem in used:
        n += 1
        stem = f"{name}_{n}"
    used.add(stem)
    return stem


def table_rows(file: str, frame: int | None, dets: Detections) -> list[list[Any]]:
    return [
        [file, frame, int(label), name, round(float(score), 4), *(round(float(v), 1) for v in box)]
        for box, score, label, name in zip(dets.boxes, dets.scores, dets.labels, dets.names, strict=True)
    ]


def make_table(rows: list[list[Any]]) -> pd.DataFrame:
    """Detections as a table; the frame column only when there are video frames (images have none)."""
    table = pd.DataFrame(rows[:MAX_TABLE_ROWS], columns=TABLE_COLUMNS)
    frames = ["" if frame is None else str(frame) for frame in table["frame"]]
    return table.assign(frame=frames) if any(frames) else table.drop(columns="frame")


def readable_error(err: Exception, path: Path, name: str) -> str:
    """The reader's message with the upload's temp path replaced by the name the user knows."""
    message = str(err).replace(str(path), name)
    return message if name in message else f"{name}: {message}"


def predict_images(
    detector: Detector,
    files: Sequence[Any],
    conf: float | dict | None = None,
    classes: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    max_images: int | None = None,
    label_scores: bool = False,
) -> Results:
    """Detect on image files and write annotated copies, YOLO txt labels, predictions.json and a zip.

    conf: None -> the model's thresholds; float; or {class: threshold}. classes: names to keep (None: all).
    Unreadable or non-image files are skipped with a message in `.problems`. Unpacks as
    (gallery [(annotated path, caption)], table DataFrame, download paths).
    """
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="dfine_demo_"))
    thresholds = class_thresholds(detector, conf, classes)
    results, rows, entries, used = Results(), [], [], set()
    annotated_files, label_files = [], []
    for item in files:
        path = file_path(item)
        if max_images is not None and len(entries) >= max_images:
            results.problems.append(f"{path.name}: skipped, at most {max_images} images per request")
            continue
        if not is_image(path):
            results.problems.append(f"{path.name}: not a supported image ({', '.join(sorted(IMAGE_EXTS))})")
            continue
        try:
            image = read_image_rgb(path)
        except (ImageReadError, OSError, ValueError) as err:
            results.problems.append(readable_error(err, path, path.name))
            continue
        dets = detector.predict([image], thresholds)[0]
        stem = unique_stem(path.stem, used)
        suffix = path.suffix.lower() if path.suffix.lower() in WRITABLE_EXTS else ".jpg"
        picture = draw_detections(image, dets.boxes, dets.labels, dets.scores, detector.class_names)
        annotated = save_image_rgb(out / "images" / f"{stem}{suffix}", picture)
        label_file = out / "labels" / f"{stem}.txt"
        atomic_write(label_file, lambda tmp, d=dets: tmp.write_text(yolo_text(d, label_scores)))
        annotated_files.append(annotated)
        label_files.append(label_file)
        results.gallery.append((str(annotated), f"{path.name}: {len(dets)} detection(s)"))
        rows += table_rows(path.name, None, dets)
        entries.append({"file": path.name, **dets.to_dict()})
        results.detections += len(dets)
    results.table = make_table(rows)
    if not entries:
        return results
    summary = {**model_summary(detector, thresholds), "images": entries, "failed": results.problems}
    predictions = atomic_write_json(out / "predictions.json", summary)
    bundle = write_zip(out / "predictions.zip", out, [predictions, *annotated_files, *label_files])
    results.downloads = [str(p) for p in (bundle, predictions, *annotated_files, *label_files)]
    return results


def model_summary(detector: Detector, thresholds: dict[int, float]) -> dict[str, Any]:
    shown = {
        detector.class_names[i]: (round(v, 4) if np.isfinite(v) else "hidden") for i, v in thresholds.items()
    }
    return {"model": str(detector.path), "backend": detector.backend, "thresholds": shown}


def write_zip(path: Path, root: Path, files: Sequence[Path]) -> Path:
    """One zip of `files` (names relative to root), for a single download."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as bundle:
            for file in files:
                bundle.write(file, file.relative_to(root).as_posix())

    return atomic_write(path, write)


# ---------------------------------------------------------------- video


@dataclass
class VideoLimits:
    max_frames: int | None = None  # None / 0: no limit
    max_seconds: float | None = None

    def frame_cap(self, fps: float) -> int | None:
        caps = [int(self.max_frames)] if self.max_frames else []
        if self.max_seconds:
            caps.append(max(1, int(round(float(self.max_seconds) * fps))))
        return min(caps) if caps else None


def predict_video(
    detector: Detector,
    video: Any,
    conf: float | dict | None = None,
    classes: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    limits: VideoLimits | None = None,
    label_scores: bool = False,
) -> Results:
    """Detect frame by frame (one frame in memory at a time); write the annotated video (.mp4 to download,
    .webm to play in the page), <stem>_predictions.json (per frame) and <stem>_labels.zip (YOLO txt per frame).

    Raises VideoReadError for a file that cannot be decoded. Frames past `limits` are not processed
    (a note says so)."""
    path = file_path(video)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="dfine_demo_"))
    if not is_video(path):
        raise VideoReadError(f"{path.name}: not a supported video ({', '.join(sorted(VIDEO_EXTS))})")
    video = open_video(path, path.name)
    fps, size, total = video.fps, video.size, video.total
    cap = (limits or VideoLimits()).frame_cap(fps)
    thresholds = class_thresholds(detector, conf, classes)
    results, rows = Results(), []
    mp4, webm = out / "videos" / f"{path.stem}.mp4", out / "videos" / f"{path.stem}.webm"
    predictions, labels_zip = out / f"{path.stem}_predictions.json", out / f"{path.stem}_labels.zip"

    def stream(json_tmp: Path, zip_tmp: Path) -> int:
        """Every frame through the model into the writers; returns the frame count."""
        frames = 0
        writers = VideoOutput([(mp4, DOWNLOAD_FOURCC), (webm, PREVIEW_FOURCC)], fps, size)
        try:
            with open(json_tmp, "w", encoding="utf-8") as handle, zipfile.ZipFile(zip_tmp, "w") as labels:
                header = {**model_summary(detector, thresholds), "video": path.name, "fps": fps}
                handle.write(json.dumps(header)[:-1] + ', "frames": [\n')  # the frames follow, streamed
                for index, frame in video.frames(cap):
                    dets = detector.predict([frame], thresholds)[0]
                    names = detector.class_names
                    writers.write(draw_detections(frame, dets.boxes, dets.labels, dets.scores, names))
                    labels.writestr(f"{path.stem}/{index:06d}.txt", yolo_text(dets, label_scores))
                    handle.write((",\n" if index else "") + json.dumps({"frame": index, **dets.to_dict()}))
                    if len(rows) < MAX_TABLE_ROWS:
                        rows.extend(table_rows(path.name, index, dets))
                    results.detections += len(dets)
                    frames += 1
                handle.write("\n]}\n")
        except BaseException:
            writers.abort()
            raise
        writers.finish()
        return frames

    counted: list[int] = []
    try:  # predictions.json and the labels zip appear only when complete (atomic_write)
        atomic_write(
            predictions,
            lambda json_tmp: atomic_write(
                labels_zip, lambda zip_tmp: counted.append(stream(json_tmp, zip_tmp))
            ),
        )
    finally:
        video.close()
    frames = counted[0]
    if frames == 0:
        raise VideoReadError(f"{path.name}: no frame could be decoded")
    if cap is not None and (total is None or total > cap) and frames == cap:
        results.notes.append(f"{path.name}: processed the first {frames} frames only (demo_ui limits)")
    results.table = make_table(rows)
    results.video = str(webm)
    results.downloads = [str(mp4), str(predictions), str(labels_zip)]
    return results


# ---------------------------------------------------------------- the app


class DemoApp:
    """The handlers behind the page (plain methods: tests call them without a browser)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.options = cfg.demo_ui
        self.models = ModelCache(
            str(cfg.device), self.options.precision, wrap=lambda detector: sliced_if_configured(detector, cfg)
        )
        # Results of recent requests live in a private temp folder (Gradio copies what it serves into its
        # own cache); it is removed at exit, and older requests are pruned as new ones come.
        self.work_root = Path(tempfile.mkdtemp(prefix="dfine_demo_ui_"))
        atexit.register(shutil.rmtree, self.work_root, ignore_errors=True)
        self.limits = VideoLimits(self.options.max_video_frames, self.options.max_video_seconds)

    def request_dir(self) -> Path:
        keep = max(1, int(self.options.keep_results))
        old = sorted(self.work_root.iterdir(), key=lambda p: p.stat().st_mtime)
        for folder in old[: max(0, len(old) - keep + 1)]:
            shutil.rmtree(folder, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.work_root))

    def model(self, choice: str | None) -> Detector:
        if not choice:
            raise ValueError(
                f"no model: train one (make demo) or type the path of a model file; none in {self.cfg.output_dir}"
            )
        return self.models.get(choice)

    def select_model(self, choice: str | None) -> tuple[float, list[str], str]:
        """(slider value, class names, model description) for a newly picked model."""
        detector = self.model(choice)
        return round(detector.meta.conf_thresh, 2), list(detector.class_names), describe_model(detector)

    def detect(
        self,
        choice: str | None,
        files: Sequence[Any] | None,
        conf: float | None,
        classes: Sequence[str] | None,
    ) -> Results:
        """Images and videos of one request. Unusable inputs become `.problems`; a model that cannot be
        loaded raises (the page shows the message)."""
        files = list(files or [])
        if not files:
            return Results(problems=["upload one or more images or a video first"])
        detector = self.model(choice)
        conf = slider_conf(detector, conf)
        out = self.request_dir()
        images = [f for f in files if not is_video(file_path(f))]
        videos = [f for f in files if is_video(file_path(f))]
        results = Results()
        if images:
            results = predict_images(detector, images, conf, classes, out, int(self.options.max_images))
        for video in videos:
            if results.video is not None:  # one video per request keeps the wait (and the page) reasonable
                results.problems.append(f"{file_path(video).name}: skipped, one video per request")
                continue
            try:
                clip = predict_video(detector, video, conf, classes, out, self.limits)
            except VideoReadError as err:
                results.problems.append(str(err))
                continue
            results.video, results.notes = clip.video, results.notes + clip.notes
            results.table = (
                pd.concat([results.table, clip.table], ignore_index=True)[TABLE_COLUMNS].fillna({"frame": ""})
                if images
                else clip.table
            )
            results.downloads += clip.downloads
            results.detections += clip.detections
        return results


def status_text(results: Results) -> str:
    shown = len(results.gallery) + (results.video is not None)
    lines = [f"{shown} file(s) processed: {results.detections} detection(s)"] if shown else []
    if len(results.table) >= MAX_TABLE_ROWS:
        lines.append(f"table shows the first {MAX_TABLE_ROWS} detections; the downloads have them all")
    lines += results.notes + [f"⚠ {problem}" for problem in results.problems]
    return "\n".join(lines)


def example_files(cfg: DictConfig) -> list[list[list[str]]]:
    """A few images (and one video) from demo_ui.examples as clickable examples, if the folder exists."""
    folder = cfg.demo_ui.examples
    if not folder or not Path(folder).is_dir():
        return []
    count = int(cfg.demo_ui.num_examples)
    picks = list_images(folder, recursive=True)[:count] + list_videos(folder, recursive=True)[:1]
    return [[[str(p)]] for p in picks]


def build_app(cfg: DictConfig, app: DemoApp | None = None):
    """The Gradio Blocks (queue configured); launch it with `launch_app`."""
    import gradio as gr

    app = app or DemoApp(cfg)
    options = cfg.demo_ui
    choices = model_choices(cfg.output_dir)
    initial = default_model(cfg)
    if initial and initial not in [value for _, value in choices]:
        choices.append((initial, initial))
    conf_value, class_names, description = 0.5, [], "no model loaded yet: pick one, or type a model file path"
    if initial:
        try:
            conf_value, class_names, description = app.select_model(initial)
        except Exception as err:  # the page still opens; the message says what is wrong
            logger.warning(f"demo: cannot load {initial}: {err}")
            description = f"⚠ cannot load `{initial}`: {err}"

    # System fonts: the default theme would fetch Google Fonts (no third-party requests from this page).
    theme = gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    with warnings.catch_warnings():  # Gradio 5 takes the theme here (Gradio 6 moves it to launch)
        warnings.filterwarnings("ignore", "The 'theme' parameter", DeprecationWarning)
        blocks = gr.Blocks(title="D-FINE detector demo", theme=theme, analytics_enabled=False)
    with blocks as demo:
        gr.Markdown("## D-FINE detector demo\nPick a model, upload images or a video, press **Detect**.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model = gr.Dropdown(
                    choices=choices,
                    value=initial,
                    label="Model (experiment artifact, or type a model file path)",
                    allow_custom_value=True,
                    elem_id="model",
                )
                info = gr.Markdown(description, elem_id="model-info")
                conf = gr.Slider(0.0, 1.0, value=conf_value, step=0.01, label="Confidence threshold",
                                 info="starts at the model's own threshold", elem_id="conf")  # fmt: skip
                classes = gr.CheckboxGroup(class_names, value=class_names, label="Classes", elem_id="classes")
                files = gr.File(
                    file_count="multiple",
                    file_types=sorted(IMAGE_EXTS | VIDEO_EXTS),
                    type="filepath",
                    label="Images or a video",
                    elem_id="upload",
                )
                detect = gr.Button("Detect", variant="primary", elem_id="detect")
                status = gr.Textbox(label="Status", lines=3, interactive=False, elem_id="status")
                examples = example_files(cfg)
                if examples:
                    gr.Examples(examples, inputs=[files], label="Examples", cache_examples=False)
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    label="Result",
                    columns=4,
                    height=560,
                    object_fit="contain",
                    preview=True,
                    elem_id="gallery",
                )
                video = gr.Video(label="Annotated video", visible=False, elem_id="video")
                table = gr.Dataframe(
                    value=make_table([]),
                    label="Detections",
                    interactive=False,
                    max_height=320,
                    elem_id="table",
                )
                downloads = gr.File(
                    label="Downloads", file_count="multiple", interactive=False, elem_id="downloads"
                )

        def on_model(choice):
            try:
                value, names, text = app.select_model(choice)
            except Exception as err:
                gr.Warning(f"cannot load the model: {err}")
                return gr.update(), gr.update(), f"⚠ cannot load `{choice}`: {err}"
            return gr.update(value=value), gr.update(choices=names, value=names), text

        def on_detect(choice, uploads, threshold, wanted):
            try:
                results = app.detect(choice, uploads, threshold, wanted)
            except Exception as err:  # a model that fails to load or run: say so in the page
                logger.exception("demo: detection failed")
                results = Results(problems=[f"{type(err).__name__}: {err}"])
            if results.problems:
                gr.Warning("; ".join(results.problems[:3]) + (" ..." if len(results.problems) > 3 else ""))
            return (
                gr.update(
                    value=results.gallery, selected_index=0 if results.gallery else None
                ),  # big first picture
                gr.update(value=results.video, visible=results.video is not None),
                results.table,
                results.downloads or None,
                status_text(results),
            )

        model.change(on_model, inputs=[model], outputs=[conf, classes, info])
        detect.click(
            on_detect,
            inputs=[model, files, conf, classes],
            outputs=[gallery, video, table, downloads, status],
        )
    return demo.queue(default_concurrency_limit=int(options.concurrency), max_size=int(options.queue_size))


# Gradio's page template references a CDN script (iframe-resizer, for embedding in other sites) and Google
# Fonts. This policy lets the browser load scripts and fonts only from this server, so it contacts no one else.
CONTENT_SECURITY_POLICY = (
    b"script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; worker-src 'self' blob:; font-src 'self' data:"
)


class LocalOnlyPolicy:
    """ASGI middleware adding CONTENT_SECURITY_POLICY to every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"content-security-policy", CONTENT_SECURITY_POLICY)]
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_policy)


def launch_app(demo, cfg: DictConfig, block: bool = True, port: int | None = None) -> str:
    """Serve `demo` on demo_ui.host:port (port None: demo_ui.port, else the first free one from 7860);
    returns the local URL. block=False returns at once (tests; demo.close() stops it)."""
    from starlette.middleware import Middleware

    options = cfg.demo_ui
    _, url, _ = demo.launch(
        server_name=str(options.host),
        server_port=port or (int(options.port) if options.port else None),
        max_file_size=options.max_file_size,
        prevent_thread_lock=True,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        quiet=True,
        app_kwargs={"middleware": [Middleware(LocalOnlyPolicy)]},
    )
    logger.info(f"demo UI on {url} (Ctrl+C to stop)")
    if str(options.host) not in {"127.0.0.1", "localhost"}:
        logger.warning(f"demo_ui.host={options.host}: reachable from other machines, without any login")
    if block:
        demo.block_thread()
    return url


def remove_temp_files_at_exit() -> Path | None:
    """Gradio's uploads go to a private temp folder of this process (unless GRADIO_TEMP_DIR is set by the
    user), removed at exit like DemoApp.work_root; SIGTERM (kill, docker stop, systemd) exits through
    Python too so that the atexit cleanup runs (its default action kills the process without it).
    Call before gradio is imported: it reads GRADIO_TEMP_DIR at import."""
    folder = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        folder = Path(tempfile.mkdtemp(prefix="dfine_demo_uploads_"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = str(folder)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    return folder


def run(cfg: DictConfig) -> str:
    cfg = stage_config(cfg)
    remove_temp_files_at_exit()
    return launch_app(build_app(cfg), cfg)


main = stage_main(run)

if __name__ == "__main__":
    main()
