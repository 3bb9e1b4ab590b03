"""A local web demo: pick a model, upload images or a video, see and download what it detects.

    make demo-ui                      # or: python -m src.demo.app [demo_ui.port=7861 demo_ui.model_path=...]

Any artifact runs (best.pt / model.onnx / model_fp32.xml / .engine, through src.runtime.load_model): the
list offers every artifact found in the experiment folders under output_dir, and a path can be typed in.
The confidence slider starts at the model's own threshold (thresholds.json / the artifact's metadata; its
per-class thresholds apply while the slider stays there). Results: annotated images (or an annotated
video), a table of detections, and downloads (annotated files, predictions.json, YOLO txt labels, one zip).
A segmentation model's instance masks are drawn under the boxes. "Track objects in videos" (start value:
demo_ui.track; tracker settings: infer.tracker) tracks a video's objects: ids drawn and in the table, MOT
txt + CSV track files to download.

Served on 127.0.0.1 only by default, with Gradio's analytics off, an upload size limit and a bounded queue.
A file that cannot be read gets a message in the page, never a crash. Videos are processed frame by frame
(memory stays bounded) up to demo_ui.max_video_frames / max_video_seconds.
Detection and the files it writes: src/demo/processing.py (images) and src/demo/video.py; this module is the
page (Gradio) and the server.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.experiment import stage_config
from src.common.images import IMAGE_EXTS, VIDEO_EXTS, is_video, list_images, list_videos
from src.common.video import VideoReadError
from src.demo.processing import (
    MAX_TABLE_ROWS,
    ModelCache,
    Results,
    default_model,
    describe_model,
    file_path,
    join_tables,
    make_table,
    model_choices,
    predict_images,
    slider_conf,
)

# re-exported (`x as x`): the tests and other callers import these from src.demo.app
from src.demo.processing import TABLE_COLUMNS as TABLE_COLUMNS
from src.demo.processing import class_thresholds as class_thresholds
from src.demo.processing import find_models as find_models
from src.demo.video import VideoLimits, predict_video
from src.dl.artifacts import sliced_if_configured
from src.runtime import Detector
from src.runtime.tracking import TrackerSettings

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
        self.tracker = TrackerSettings.from_config(cfg.infer.tracker)  # the same tracking as dl.infer

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
        track: bool | None = None,
    ) -> Results:
        """Images and videos of one request; track: track the video's objects (None: demo_ui.track).
        Unusable inputs become `.problems`; a model that cannot be loaded raises (the page shows it)."""
        files = list(files or [])
        if not files:
            return Results(problems=["upload one or more images or a video first"])
        detector = self.model(choice)
        conf = slider_conf(detector, conf)
        out = self.request_dir()
        images = [f for f in files if not is_video(file_path(f))]
        videos = [f for f in files if is_video(file_path(f))]
        tracker = self.tracker if (self.options.track if track is None else track) else None
        results = Results()
        if images:
            results = predict_images(detector, images, conf, classes, out, int(self.options.max_images))
        for video in videos:
            if results.video is not None:  # one video per request keeps the wait (and the page) reasonable
                results.problems.append(f"{file_path(video).name}: skipped, one video per request")
                continue
            try:
                clip = predict_video(detector, video, conf, classes, out, self.limits, tracker=tracker)
            except VideoReadError as err:
                results.problems.append(str(err))
                continue
            results.video, results.notes = clip.video, results.notes + clip.notes
            results.table = join_tables(results.table, clip.table)
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
                track = gr.Checkbox(
                    value=bool(options.track),
                    label="Track objects in videos",
                    info="ids that follow each object from frame to frame (ByteTrack)",
                    elem_id="track",
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

        def on_detect(choice, uploads, threshold, wanted, tracking):
            try:
                results = app.detect(choice, uploads, threshold, wanted, bool(tracking))
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
            inputs=[model, files, conf, classes, track],
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
