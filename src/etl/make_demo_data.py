"""Synthetic detection (or, demo_data.polygons, segmentation) data made locally (no download): shapes on
cluttered, textured backgrounds.

    python -m src.etl.make_demo_data                       # -> data/demo (demo_data.out)
    python -m src.etl.make_demo_data demo_data.out=/tmp/d demo_data.num_images=50

Writes <out>/images/demo_XXXX.jpg + <out>/labels/demo_XXXX.txt (about 10% background-only: half with an
empty label file, half with none), <out>/negatives/neg_XXXX.jpg (held-out background-only images: clutter,
no shapes; never in images/) and <out>/videos/demo_XX.mp4 (~3 s of moving shapes).
Classes are the label_to_name names, each one of circle / square / triangle / star.
Objects are demo_data.object_scale of the shorter image side, 1-6 per image, may overlap a little (the later one
occludes); demo_data.clutter distractor strokes per image (lines, arcs, smudges).
demo_data.polygons=true writes every object as a YOLO-seg polygon line instead of a box line: the exact outline
of the drawn shape (a circle as a 32-point polygon, the corners of squares, triangles and stars), the same
images bit for bit. An occluded shape keeps its whole outline, as its box does.
Everything is a function of demo_data.seed, so a re-run over a previous demo set writes the same files;
a non-empty folder that is not a demo set (no demo_data.json in it) is refused, never overwritten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.config import label_names, stage_main
from src.common.images import parallel_map
from src.common.io import atomic_write, atomic_write_json
from src.common.video import VideoOutput
from src.etl.labels import images_dir, labels_dir, write_yolo_labels
from src.etl.polygons import clip_polygon_to_rect

SHAPES = ("circle", "square", "triangle", "star")
CIRCLE_POINTS = 32  # a circle's polygon label: corners on the circle (area 99.4% of it, the same box)
MARKER = "demo_data.json"  # marks a folder as ours, so a re-run may write into it
BACKGROUND_EVERY = 10  # every 10th image is background-only
MIN_OBJECTS, MAX_OBJECTS = 1, 6
MAX_OVERLAP = 0.4  # a new object may cover at most this fraction of an earlier one's box (and vice versa)
VIDEO_SIZE, VIDEO_FPS, VIDEO_SECONDS = (384, 288), 15, 3
JPG_QUALITY = 90

# Separate random streams per output kind, so adding videos never changes the images.
STREAM_IMAGE, STREAM_NEGATIVE, STREAM_VIDEO = 0, 1, 2


@dataclass
class Shape:
    class_id: int
    kind: str
    points: np.ndarray  # (K, 2) float polygon in pixels; a circle is (center, (radius, 0))
    color: tuple[int, int, int]

    def xyxy(self) -> np.ndarray:
        if self.kind == "circle":
            (cx, cy), (r, _) = self.points
            return np.array([cx - r, cy - r, cx + r, cy + r])
        return np.concatenate([self.points.min(0), self.points.max(0)])

    def outline(self) -> np.ndarray:
        """(K, 2) polygon in pixels of what draw_shape fills (a circle: CIRCLE_POINTS corners on it, one
        at each of 0, 90, 180 and 270 degrees, so its box is the circle's)."""
        if self.kind == "circle":
            (cx, cy), (r, _) = self.points
            return regular_polygon(np.array([cx, cy]), r, CIRCLE_POINTS, 0.0)
        return np.asarray(self.points, np.float64)


# ---------------------------------------------------------------- backgrounds and clutter


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient between two colours + low-frequency colour blotches + pixel noise, uint8 (H, W, 3) BGR."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs / width * np.cos(angle) + ys / height * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
    coarse = rng.normal(0, rng.uniform(10, 40), (rng.integers(3, 8), rng.integers(3, 8), 3)).astype(
        np.float32
    )
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(2, 10)
    return np.clip(image, 0, 255).astype(np.uint8)


def random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def draw_clutter(rng: np.random.Generator, image: np.ndarray, amount: int) -> None:
    """Distractors that share edges and colours with the shapes but are none of them: lines, arcs, smudges."""
    height, width = image.shape[:2]
    for _ in range(amount):
        kind = rng.integers(0, 4)
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if kind == 0:  # straight line
            p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, p1, p2, random_color(rng), int(rng.integers(1, 4)), cv2.LINE_AA)
        elif kind == 1:  # open arc (never a closed circle)
            axes = (int(rng.integers(8, width // 3)), int(rng.integers(8, height // 3)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(
                image,
                p1,
                axes,
                0,
                start,
                start + rng.uniform(40, 200),
                random_color(rng),
                int(rng.integers(1, 3)),
                cv2.LINE_AA,
            )
        elif kind == 2:  # soft elongated smudge
            smudge = np.zeros_like(image)
            axes = (int(rng.integers(10, width // 4)), int(rng.integers(3, 10)))
            cv2.ellipse(smudge, p1, axes, float(rng.uniform(0, 180)), 0, 360, random_color(rng), -1)
            mask = cv2.GaussianBlur((smudge.max(-1) > 0).astype(np.float32), (0, 0), 5)[..., None] * 0.6
            image[:] = (image * (1 - mask) + cv2.GaussianBlur(smudge, (0, 0), 5) * mask).astype(np.uint8)
        else:  # zig-zag polyline
            points = np.cumsum(rng.normal(0, width / 12, (int(rng.integers(3, 7)), 2)), axis=0) + p1
            cv2.polylines(
                image,
                [points.astype(np.int32)],
                False,
                random_color(rng),
                int(rng.integers(1, 3)),
                cv2.LINE_AA,
            )


# ---------------------------------------------------------------- shapes


def regular_polygon(center: np.ndarray, radius: float, corners: int, rotation: float) -> np.ndarray:
    angles = rotation + np.arange(corners) * 2 * np.pi / corners
    return center + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def class_color(rng: np.random.Generator, class_id: int, num_classes: int) -> tuple[int, int, int]:
    """A saturated colour from the class's own hue band (hues spread evenly over the classes), so colour
    is a cue for the class beside the shape: the demo model can learn it within minutes on a CPU."""
    hue = (class_id * 180 / num_classes + rng.uniform(-8, 8)) % 180  # OpenCV hue range is 0-180
    hsv = np.uint8([[[hue, rng.integers(160, 256), rng.integers(140, 256)]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def make_shape(
    rng: np.random.Generator,
    kind: str,
    class_id: int,
    center: np.ndarray,
    size: float,
    color: tuple[int, int, int] | None = None,
) -> Shape:
    """A shape whose bounding box is about size x size pixels, centred at center (random colour if None)."""
    color = color or random_color(rng)
    radius = size / 2
    if kind == "circle":
        return Shape(class_id, kind, np.array([center, [radius, 0.0]]), color)
    if kind == "square":
        # Up to +-25 degrees of rotation keeps it a square, not a diamond; shrink so the rotated box fits `size`.
        rotation = rng.uniform(-25, 25) * np.pi / 180
        half = radius / (abs(np.cos(rotation)) + abs(np.sin(rotation)))
        corners = regular_polygon(np.zeros(2), half * np.sqrt(2), 4, np.pi / 4 + rotation)
        return Shape(class_id, kind, center + corners, color)
    if kind == "triangle":
        points = regular_polygon(center, radius, 3, rng.uniform(0, 2 * np.pi))
        points += rng.normal(0, radius * 0.08, points.shape)  # not always equilateral
        return Shape(class_id, kind, points, color)
    if kind == "star":
        # 10 corners alternating between the outer radius and an inner one
        angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.38, 0.5))
        points = center + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return Shape(class_id, kind, points, color)
    raise ValueError(f"unknown demo shape {kind!r}; known: {', '.join(SHAPES)}")


def contrasting(color: tuple[int, int, int], under: np.ndarray) -> tuple[int, int, int]:
    """Darken (on a bright background) or lighten the colour so it stays visible; all channels move
    together, so the hue (a class cue with demo_data.class_colors) is kept."""
    mean = under.reshape(-1, 3).mean(0) if under.size else np.full(3, 128.0)
    rgb = np.array(color, dtype=np.float64)
    if np.abs(rgb - mean).sum() >= 150:
        return color
    shifted = rgb * 0.35 if mean.mean() > 127 else 255 - (255 - rgb) * 0.35
    return tuple(int(v) for v in shifted)


def draw_shape(image: np.ndarray, shape: Shape, outline: int) -> None:
    x1, y1, x2, y2 = np.clip(shape.xyxy(), 0, None).astype(int)
    color = contrasting(shape.color, image[y1:y2, x1:x2])
    edge = tuple(int(c * 0.5) for c in color)
    if shape.kind == "circle":
        (cx, cy), (r, _) = shape.points
        center = (round(cx * 16), round(cy * 16))  # 4 fractional bits: sub-pixel placement
        cv2.circle(image, center, round(r * 16), color, -1, cv2.LINE_AA, shift=4)
        if outline:
            cv2.circle(image, center, round(r * 16), edge, outline, cv2.LINE_AA, shift=4)
        return
    points = np.round(shape.points * 16).astype(np.int32)
    cv2.fillPoly(image, [points], color, cv2.LINE_AA, shift=4)
    if outline:
        cv2.polylines(image, [points], True, edge, outline, cv2.LINE_AA, shift=4)


def overlaps_too_much(box: np.ndarray, others: list[np.ndarray]) -> bool:
    for other in others:
        inter_w = min(box[2], other[2]) - max(box[0], other[0])
        inter_h = min(box[3], other[3]) - max(box[1], other[1])
        if inter_w <= 0 or inter_h <= 0:
            continue
        inter = inter_w * inter_h
        smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
        if inter > MAX_OVERLAP * smaller:
            return True
    return False


def place_shapes(
    rng: np.random.Generator,
    height: int,
    width: int,
    classes: list[str],
    count: int,
    scale: tuple[float, float],
    class_colors: bool,
) -> list[Shape]:
    """`count` shapes (fewer when they do not fit), each `scale` (min, max) of the shorter side."""
    shapes: list[Shape] = []
    short = min(height, width)
    for _ in range(count):
        for _attempt in range(30):
            size = rng.uniform(*scale) * short
            center = np.array(
                [rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2)]
            )
            class_id = int(rng.integers(0, len(classes)))
            color = class_color(rng, class_id, len(classes)) if class_colors else None
            shape = make_shape(rng, classes[class_id], class_id, center, size, color)
            if not overlaps_too_much(shape.xyxy(), [s.xyxy() for s in shapes]):
                shapes.append(shape)
                break
    return shapes


def yolo_boxes(shapes: list[Shape], height: int, width: int) -> np.ndarray:
    """Normalised cxcywh (N, 4) of the shapes' pixel boxes, clipped to the image."""
    xyxy = np.array([s.xyxy() for s in shapes], dtype=np.float64).reshape(-1, 4)
    xyxy = np.clip(xyxy, 0, [width, height, width, height])
    cxcywh = np.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 2,
            (xyxy[:, 1] + xyxy[:, 3]) / 2,
            xyxy[:, 2] - xyxy[:, 0],
            xyxy[:, 3] - xyxy[:, 1],
        ],
        1,
    )
    return cxcywh / [width, height, width, height]


def yolo_polygons(shapes: list[Shape], height: int, width: int) -> list[np.ndarray | None]:
    """Each shape's outline clipped to the image and normalised (K, 2)."""
    size = np.array([width, height], np.float64)
    clipped = [clip_polygon_to_rect(s.outline(), (0, 0, width, height)) for s in shapes]
    return [p / size if p is not None else None for p in clipped]


def finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera-ish noise and sometimes a slight blur over everything (shapes included)."""
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.2))
    noisy = image.astype(np.float32) + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(1, 6)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def object_scale(dc: DictConfig) -> tuple[float, float]:
    low, high = (float(v) for v in dc.object_scale)
    if not 0 < low <= high <= 0.9:
        raise ValueError(f"demo_data.object_scale must be 0 < min <= max <= 0.9, got {[low, high]}")
    return low, high


def make_scene(
    rng: np.random.Generator, height: int, width: int, classes: list[str], num_objects: int, dc: DictConfig
):
    image = textured_background(rng, height, width)
    low, high = (int(v) for v in dc.clutter)
    draw_clutter(rng, image, int(rng.integers(low, high + 1)))
    shapes = place_shapes(rng, height, width, classes, num_objects, object_scale(dc), bool(dc.class_colors))
    for shape in shapes:
        draw_shape(image, shape, outline=int(rng.integers(0, 3)))
    return finish(rng, image), shapes


# ---------------------------------------------------------------- writing


def write_jpg(path: Path, image_bgr: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, JPG_QUALITY])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    atomic_write(path, lambda tmp: tmp.write_bytes(data.tobytes()))


def random_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    return int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))


def make_labelled_image(index: int, out: Path, dc: DictConfig, classes: list[str]) -> list[str]:
    """One images/demo_XXXX.jpg (+ its label file); returns the paths written, relative to out."""
    rng = np.random.default_rng([int(dc.seed), STREAM_IMAGE, index])
    height, width = random_size(rng, int(dc.min_size), int(dc.max_size))
    background_only = index % BACKGROUND_EVERY == BACKGROUND_EVERY - 1
    count = 0 if background_only else int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    image, shapes = make_scene(rng, height, width, classes, count, dc)
    stem = f"demo_{index:04d}"
    write_jpg(images_dir(out) / f"{stem}.jpg", image)
    written = [f"images/{stem}.jpg"]
    # Background images: alternately an empty label file and no label file (both mean "no objects").
    if not background_only or (index // BACKGROUND_EVERY) % 2 == 0:
        polygons = yolo_polygons(shapes, height, width) if dc.polygons else None
        write_yolo_labels(
            labels_dir(out) / f"{stem}.txt",
            [s.class_id for s in shapes],
            yolo_boxes(shapes, height, width),
            polygons,
        )
        written.append(f"labels/{stem}.txt")
    return written


def make_negative(index: int, out: Path, dc: DictConfig, classes: list[str]) -> list[str]:
    rng = np.random.default_rng([int(dc.seed), STREAM_NEGATIVE, index])
    height, width = random_size(rng, int(dc.min_size), int(dc.max_size))
    image, _ = make_scene(rng, height, width, classes, 0, dc)
    write_jpg(out / "negatives" / f"neg_{index:04d}.jpg", image)
    return [f"negatives/neg_{index:04d}.jpg"]


def make_video(index: int, out: Path, dc: DictConfig, classes: list[str]) -> list[str]:
    """~3 s mp4 of 2-4 shapes moving (bouncing off the borders) over a fixed cluttered background."""
    rng = np.random.default_rng([int(dc.seed), STREAM_VIDEO, index])
    width, height = VIDEO_SIZE
    background = textured_background(rng, height, width)
    draw_clutter(rng, background, 8)
    shapes = place_shapes(
        rng, height, width, classes, int(rng.integers(2, 5)), object_scale(dc), bool(dc.class_colors)
    )
    velocity = rng.uniform(-4, 4, (len(shapes), 2))
    path = out / "videos" / f"demo_{index:02d}.mp4"
    video = VideoOutput([(path, "mp4v")], VIDEO_FPS, (width, height))
    try:
        for _ in range(VIDEO_FPS * VIDEO_SECONDS):
            frame = background.copy()  # (H, W, 3) BGR, as every picture here
            for shape, v in zip(shapes, velocity, strict=True):
                x1, y1, x2, y2 = shape.xyxy()
                v[0] *= -1 if (x1 + v[0] < 0 or x2 + v[0] > width) else 1
                v[1] *= -1 if (y1 + v[1] < 0 or y2 + v[1] > height) else 1
                shape.points = shape.points + (v if shape.kind != "circle" else np.stack([v, np.zeros(2)]))
                draw_shape(frame, shape, outline=1)
            video.write(frame[..., ::-1])
    except BaseException:
        video.abort()
        raise
    video.finish()
    return [f"videos/{path.name}"]


def demo_classes(cfg: DictConfig) -> list[str]:
    classes = label_names(cfg)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(
            f"make_demo_data draws only {', '.join(SHAPES)}; label_to_name has {', '.join(unknown)}"
        )
    return classes


def previous_demo_files(out: Path) -> list[str] | None:
    """Files a previous run wrote into `out` (None: `out` holds something else, so it must not be touched)."""
    if not out.exists() or not any(out.iterdir()):
        return []
    marker = out / MARKER
    if not marker.is_file():
        raise FileExistsError(
            f"{out} is not empty and is not a previous demo set (no {MARKER}); refusing to write demo data "
            "into it. Choose an empty or new folder: demo_data.out=<folder>"
        )
    return list(OmegaConf.to_container(OmegaConf.load(marker)).get("files", []))


def run(cfg: DictConfig) -> Path:
    dc = cfg.demo_data
    out = Path(dc.out)
    classes = demo_classes(cfg)
    if int(dc.min_size) < 64 or int(dc.min_size) > int(dc.max_size):
        raise ValueError(f"demo_data: need 64 <= min_size <= max_size, got {dc.min_size}, {dc.max_size}")
    object_scale(dc)  # a bad range fails here, before anything is written
    old_files = previous_demo_files(out)
    settings = OmegaConf.to_container(dc, resolve=True)
    # The marker goes first: an interrupted run still leaves a folder a re-run may write into.
    atomic_write_json(
        out / MARKER, {"settings": settings, "classes": classes, "complete": False, "files": old_files}
    )

    workers = max(1, os.cpu_count() or 1)
    written: list[str] = []
    jobs = [
        (make_labelled_image, int(dc.num_images)),
        (make_negative, int(dc.num_negatives)),
        (make_video, int(dc.num_videos)),
    ]
    for make, count in jobs:
        results = parallel_map(
            lambda i, make=make: make(i, out, dc, classes), list(range(count)), workers, make.__name__
        )
        written += [p for paths in results for p in paths]

    stale = sorted(set(old_files) - set(written))  # ours from a bigger earlier run; nothing else is removed
    for rel in stale:
        (out / rel).unlink(missing_ok=True)
    atomic_write_json(
        out / MARKER, {"settings": settings, "classes": classes, "complete": True, "files": written}
    )
    logger.info(
        f"demo data in {out}: {dc.num_images} images ({sum(p.startswith('labels/') for p in written)} label files), "
        f"{dc.num_negatives} negatives, {dc.num_videos} videos; classes {classes}"
    )
    return out


main = stage_main(run)

if __name__ == "__main__":
    main()
