"""Drawing boxes, labels and GT-vs-prediction pictures (debug images, eval pictures, infer, bench, demo).

All functions take and return RGB uint8 images (H, W, 3), the convention of `read_image_rgb`, and never
modify the image they are given. Colours are RGB tuples.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from loguru import logger
from PIL import Image, ImageDraw, ImageFont

from src.common.io import atomic_write
from src.common.network_input import PAD_VALUE, letterbox_or_resize

GT_COLOR = (0, 200, 0)  # green
PRED_COLOR = (230, 40, 40)  # red
TEXT_COLOR = (255, 255, 255)

# A palette with well separated hues (one colour per class id, cycling).
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (128, 128, 0),
    (0, 0, 128),
    (255, 225, 25),
    (128, 128, 128),
]


def class_color(class_id: int) -> tuple[int, int, int]:
    return _PALETTE[int(class_id) % len(_PALETTE)]


def _as_numpy(values, dtype) -> np.ndarray:
    if values is None:
        return np.zeros((0,), dtype=dtype)
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _line_width(image: np.ndarray) -> int:
    return max(1, round(max(image.shape[:2]) / 400))


def label_text(label: int, score: float | None = None, class_names: Sequence[str] | None = None) -> str:
    name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
    return name if score is None else f"{name} {score:.2f}"


def _put_label(image: np.ndarray, text: str, x1: int, y1: int, color, line_width: int) -> None:
    """Text on a filled box above the box's top-left corner (inside the image when at the top edge)."""
    font_scale = max(0.35, line_width / 3)
    if not text.isascii():  # OpenCV's Hershey fonts have ASCII only: anything else would be drawn as "?"
        _put_unicode_label(image, text, x1, y1, color, font_scale)
        return
    thickness = max(1, line_width - 1)
    (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    x1, top = _label_corner(image, x1, y1, text_w, text_h + baseline)
    cv2.rectangle(image, (x1, top), (x1 + text_w + 2, top + text_h + baseline + 2), color, -1)
    cv2.putText(
        image,
        text,
        (x1 + 1, top + text_h + 1),
        cv2.FONT_HERSHEY_SIMPLEX,
        font_scale,
        TEXT_COLOR,
        thickness,
        cv2.LINE_AA,
    )


def _label_corner(image: np.ndarray, x1: int, y1: int, text_w: int, text_h: int) -> tuple[int, int]:
    """Top-left corner of a text_w x text_h label over (x1, y1): above it, below when at the top edge, and
    inside the image's width."""
    top = y1 - text_h - 2
    if top < 0:
        top = y1 + 1
    return min(max(0, x1), max(0, image.shape[1] - text_w - 2)), top


# Fonts for label text beyond ASCII, tried in order for each character. DejaVu Sans
# (Latin, Greek, Cyrillic, Hebrew, Arabic...) comes with matplotlib when Debian's fonts-dejavu-core is absent;
# CJK needs Debian's fonts-droid-fallback (`make setup` installs it where it can) or one of the others.
UNICODE_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
)
HERSHEY_TO_POINTS = 30  # a TrueType size drawing capitals as tall as Hershey simplex at scale 1 (22 px)


@functools.cache
def _font_files() -> tuple[Path, ...]:
    import matplotlib

    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return tuple(p for p in (*map(Path, UNICODE_FONTS), bundled) if p.is_file())


@functools.cache
def _characters(path: Path) -> frozenset[int]:
    """Code points a font file has glyphs for (the first font of a collection)."""
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=0, lazy=True) as font:
        return frozenset(font.getBestCmap())


@functools.cache
def font_for(char: str) -> Path | None:
    """The first font file with a glyph for char (None: no font has it, said once per character)."""
    found = next((path for path in _font_files() if ord(char) in _characters(path)), None)
    if found is None and not char.isspace():
        logger.warning(
            f"no installed font has {char!r} (U+{ord(char):04X}), drawn as a box in labels: install "
            "fonts-droid-fallback (CJK) or another font that has it (`make setup`)"
        )
    return found


def font_runs(text: str) -> list[tuple[Path | None, str]]:
    """text cut into runs of characters that one font draws (a space joins the run before it)."""
    runs: list[tuple[Path | None, str]] = []
    for char in text:
        path = runs[-1][0] if runs and char.isspace() else font_for(char)
        if runs and runs[-1][0] == path:
            runs[-1] = (path, runs[-1][1] + char)
        else:
            runs.append((path, char))
    return runs


@functools.cache
def _truetype(path: Path | None, size: int):

    return ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size)


def _put_unicode_label(image: np.ndarray, text: str, x1: int, y1: int, color, font_scale: float) -> None:
    """_put_label's box and text drawn with TrueType fonts (PIL) that have the text's characters, each run
    of characters in the first font that has them, on one baseline."""

    size = max(8, round(HERSHEY_TO_POINTS * font_scale))
    runs = [(_truetype(path, size), part) for path, part in font_runs(text)]
    boxes = [font.getbbox(part, anchor="ls") for font, part in runs]  # (left, top, right, bottom) to the baseline
    ascent, descent = max(-b[1] for b in boxes), max(b[3] for b in boxes)
    text_w = round(sum(font.getlength(part) for font, part in runs))
    x1, top = _label_corner(image, x1, y1, text_w, ascent + descent)
    x2, y2 = min(x1 + text_w + 2, image.shape[1]), min(top + ascent + descent + 2, image.shape[0])
    if x2 <= x1 or y2 <= top:
        return
    cv2.rectangle(image, (x1, top), (x2, y2), color, -1)
    patch = Image.fromarray(np.ascontiguousarray(image[top:y2, x1:x2]))
    pen, draw = 1.0, ImageDraw.Draw(patch)
    for font, part in runs:
        draw.text((pen, 1 + ascent), part, font=font, fill=TEXT_COLOR, anchor="ls")
        pen += font.getlength(part)
    image[top:y2, x1:x2] = np.asarray(patch)


def draw_detections(
    image: np.ndarray,
    boxes_xyxy,
    labels,
    scores=None,
    class_names: Sequence[str] | None = None,
    color: tuple[int, int, int] | None = None,
    line_width: int | None = None,
    show_labels: bool = True,
) -> np.ndarray:
    """Draw xyxy pixel boxes with "name score" tags on a copy of `image`.

    color None: one colour per class. boxes/labels/scores may be numpy arrays, torch tensors or lists.
    """
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    boxes = _as_numpy(boxes_xyxy, np.float64).reshape(-1, 4)
    labels = _as_numpy(labels, np.int64).reshape(-1)
    scores_np = None if scores is None else _as_numpy(scores, np.float64).reshape(-1)
    width = line_width or _line_width(out)
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        box_color = color if color is not None else class_color(label)
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), box_color, width)
        if show_labels:
            score = None if scores_np is None else float(scores_np[i])
            _put_label(out, label_text(int(label), score, class_names), x1, y1, box_color, width)
    return out


MASK_ALPHA = 0.45  # opacity of a filled instance mask: the object stays visible under its colour


def draw_masks(
    image: np.ndarray,
    masks,
    labels,
    color: tuple[int, int, int] | None = None,
    alpha: float = MASK_ALPHA,
) -> np.ndarray:
    """Instance masks (N, H, W) bool at the image's size, filled semi-transparent with a 1-2 px contour
    in each class's colour (or `color`), on a copy of `image` (H, W, 3) uint8. Draw boxes after this."""
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    masks = _as_numpy(masks, bool).reshape(-1, *out.shape[:2])
    labels = _as_numpy(labels, np.int64).reshape(-1)
    width = max(1, _line_width(out) // 2)
    for mask, label in zip(masks, labels, strict=True):
        if not mask.any():
            continue
        mask_color = np.array(color if color is not None else class_color(label), np.float32)
        out[mask] = (out[mask] * (1 - alpha) + mask_color * alpha).round().astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in mask_color), width, cv2.LINE_AA)
    return out


def draw_gt_vs_pred(
    image: np.ndarray,
    gt_boxes,
    gt_labels,
    pred_boxes,
    pred_labels,
    pred_scores=None,
    class_names: Sequence[str] | None = None,
    gt_masks=None,
    pred_masks=None,
) -> np.ndarray:
    """Ground truth in green, predictions in red (with scores) on one copy of the image; instance masks
    (N, H, W) bool (segmentation) are filled under the boxes in the same colours."""
    out = image
    for masks, color in ((gt_masks, GT_COLOR), (pred_masks, PRED_COLOR)):
        if masks is not None:
            out = draw_masks(out, masks, np.zeros(len(masks), np.int64), color=color)
    out = draw_detections(out, gt_boxes, gt_labels, None, class_names, color=GT_COLOR)
    return draw_detections(out, pred_boxes, pred_labels, pred_scores, class_names, color=PRED_COLOR)


def put_title(image: np.ndarray, text: str) -> np.ndarray:
    """A caption strip on top of a copy of the image (e.g. the file name in an eval grid)."""
    out = image.copy()
    _put_label(out, text, 0, 0, (40, 40, 40), _line_width(out))
    return out


def tile_images(
    images: Sequence[np.ndarray], cols: int | None = None, tile_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Put images in a grid (row-major). tile_size (w, h): every tile is letterboxed to it; default: the
    largest image's size. Empty cells are grey."""
    if not images:
        raise ValueError("tile_images needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    tile_w, tile_h = tile_size or (max(i.shape[1] for i in images), max(i.shape[0] for i in images))
    grid = np.full((rows * tile_h, cols * tile_w, 3), PAD_VALUE, dtype=np.uint8)
    for n, image in enumerate(images):
        tile, _ = letterbox_or_resize(image, (tile_h, tile_w), keep_ratio=True)
        r, c = divmod(n, cols)
        grid[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w] = tile
    return grid


def save_image_rgb(path: str | Path, image: np.ndarray, jpg_quality: int = 95) -> Path:
    """Write an RGB image atomically; the format follows the suffix (.jpg, .png, ...)."""
    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpg_quality)] if path.suffix.lower() in {".jpg", ".jpeg"} else []
    ok, encoded = cv2.imencode(path.suffix or ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode an image as {path.suffix!r} for {path}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(encoded.tobytes()))


def draw_tracks(
    image: np.ndarray,
    boxes_xyxy,
    track_ids,
    labels,
    scores=None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Tracked boxes with "#id name score" tags on a copy of `image`, one colour per track id (so an id
    switch shows as a colour change)."""
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    boxes = _as_numpy(boxes_xyxy, np.float64).reshape(-1, 4)
    ids = _as_numpy(track_ids, np.int64).reshape(-1)
    labels = _as_numpy(labels, np.int64).reshape(-1)
    scores_np = None if scores is None else _as_numpy(scores, np.float64).reshape(-1)
    width = _line_width(out)
    for i, (box, track_id, label) in enumerate(zip(boxes, ids, labels, strict=True)):
        color = class_color(int(track_id))
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, width)
        score = None if scores_np is None else float(scores_np[i])
        _put_label(out, f"#{track_id} {label_text(int(label), score, class_names)}", x1, y1, color, width)
    return out
