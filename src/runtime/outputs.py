"""What a run writes for its detections, shared by the infer stage and the demo: YOLO txt (boxes, or polygons
for a segmentation model), instance-id masks, crops, drawings, and the one rule that names every output
file after its input (`OutputNames`).

OutputNames: inputs are named by their path relative to the run's root. Each input gets a key: that path
without its extension (sub/a.jpg -> sub/a) when no other input has the same stem and no other input is
named like that stem; otherwise the whole path (a.jpg, a.png, a.jpg.jpg keep apart as a.jpg, a.png,
a.jpg.jpg). Keys are therefore distinct, and every output is `<kind folder>/<key><fixed suffix>` (labels
.txt, masks .png, videos .mp4, tracks .txt/.csv, crops _<n>.jpg), or lies inside `<key>_frames/` for the
frames of a video. Drawings keep the image's own name (a format OpenCV cannot write: <key>.jpg, made
distinct from every other drawing's name). A folder of the input keeps its name
unless it ends like an output (x.txt/, clip_frames/): then it gets one more "_", so that no output file or
frame folder can have the name of an input folder. Distinct inputs thus never share an output name, and
no output name is a folder another output needs (tests/test_runtime_outputs.py checks this on generated
names). Names are compared as they are written: on a file system that ignores case, a.JPG and a.jpg meet.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from src.common.draw import draw_detections, draw_masks
from src.common.io import atomic_write
from src.common.masks import mask_to_polygon
from src.common.yolo_lines import format_yolo_lines
from src.runtime.detector import SCORE_DECIMALS, Detections

# Drawings keep their image's format when OpenCV can write it; anything else (HEIC, TIFF...) becomes JPG.
WRITABLE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
FRAMES = "_frames"  # <key>_frames/: the per-frame files of a video
# Endings of output names: an input folder ending like one of them (then any number of "_") gets one more
# "_". The mapping is one-to-one, and no renamed folder ends like an output.
OUTPUT_ENDING = re.compile(r"(\.(txt|csv|png|jpe?g|bmp|webp|mp4)|_frames)_*$", re.IGNORECASE)


def escaped_folder(name: str) -> str:
    return f"{name}_" if OUTPUT_ENDING.search(name) else name


def escaped_part(name: str) -> str:
    """A name (e.g. a class name) as one path component: '%' and '/' percent-encoded, '.' and '..' too."""
    encoded = name.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")
    return encoded if encoded not in ("", ".", "..") else encoded.replace(".", "%2E") or "%00"


class OutputNames:
    """Every output name of a run's inputs, from their paths relative to the run's root (see module doc)."""

    def __init__(self, relative_paths: Iterable[str | PurePosixPath | Path]):
        paths = [PurePosixPath(Path(p).as_posix()) for p in relative_paths]
        if len(set(paths)) != len(paths):
            raise ValueError("two inputs with the same relative path")
        stems = Counter(p.with_suffix("") for p in paths)
        names = set(paths)
        self._keys = {path: self._key(path, stems, names) for path in paths}
        self._drawings = self._drawing_names(paths)

    @staticmethod
    def _key(path: PurePosixPath, stems: Counter, names: set[PurePosixPath]) -> PurePosixPath:
        stem = path.with_suffix("")
        own = stem if stems[stem] == 1 and stem not in names else path
        return PurePosixPath(*map(escaped_folder, own.parent.parts), own.name)

    def _drawing_names(self, paths: list[PurePosixPath]) -> dict[PurePosixPath, PurePosixPath]:
        """An image OpenCV writes keeps its own name (a.jpg, a.png); any other becomes <key>.jpg, with "_"
        added before .jpg while that name is taken (a.heic beside an a.heic.jpg): names given in order, so
        none is given twice."""
        escaped = {p: PurePosixPath(*map(escaped_folder, p.parent.parts), p.name) for p in paths}
        drawings = {p: escaped[p] for p in paths if p.suffix.lower() in WRITABLE_EXTS}
        taken = set(drawings.values())
        for path in sorted(p for p in paths if p not in drawings):
            name = self._keys[path].with_name(self._keys[path].name + ".jpg")
            while name in taken:
                name = name.with_name(name.name.removesuffix(".jpg") + "_.jpg")
            drawings[path] = name
            taken.add(name)
        return drawings

    def key(self, relative: str | PurePosixPath | Path) -> PurePosixPath:
        return self._keys[PurePosixPath(Path(relative).as_posix())]

    @classmethod
    def of_files(cls, paths: Iterable[Path]) -> tuple[OutputNames, Path]:
        """(names, root) for files anywhere: their paths relative to their deepest common folder."""
        paths = [Path(p) for p in paths]
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path()
        return cls(p.relative_to(root) for p in paths), root

    def in_folder(self, folder: str, relative, suffix: str) -> PurePosixPath:
        """<folder>/<key><suffix>: a kind of output of its own (one fixed suffix), e.g. a stage's pictures."""
        key = self.key(relative)
        return PurePosixPath(folder) / key.with_name(key.name + suffix)

    def label(self, relative) -> PurePosixPath:
        return self.in_folder("labels", relative, ".txt")

    def frame_label(self, relative, frame: int) -> PurePosixPath:
        return self.in_folder("labels", relative, FRAMES) / f"{frame:06d}.txt"

    def mask(self, relative) -> PurePosixPath:
        return self.in_folder("masks", relative, ".png")

    def drawing(self, relative) -> PurePosixPath:
        """images/<the image's own name> when OpenCV writes its format, else images/<key>.jpg (see
        _drawing_names)."""
        return PurePosixPath("images") / self._drawings[PurePosixPath(Path(relative).as_posix())]

    def video(self, relative) -> PurePosixPath:
        return self.in_folder("videos", relative, ".mp4")

    def tracks(self, relative) -> PurePosixPath:
        """tracks/<key> without a suffix: the MOT .txt and the .csv take it."""
        return self.in_folder("tracks", relative, "")

    def crop(self, relative, class_name: str, index: int, frame: int | None = None) -> PurePosixPath:
        """crops/<class>/<key>_<index>.jpg, or crops/<class>/<key>_frames/<frame>_<index>.jpg for a video."""
        folder = f"crops/{escaped_part(class_name)}"
        if frame is None:
            return self.in_folder(folder, relative, f"_{index}.jpg")
        return self.in_folder(folder, relative, FRAMES) / f"{frame:06d}_{index}.jpg"


# ---------------------------------------------------------------------------------------------- writers


def yolo_text(dets: Detections, with_scores: bool) -> str:
    """YOLO txt lines (normalised cx cy w h) for detections in pixels, or YOLO-seg polygon lines for
    detections with masks (common.masks.mask_to_polygon: the largest part's outline; an empty mask keeps
    the box line); optional trailing score column."""
    height, width = dets.image_size
    x1, y1, x2, y2 = dets.boxes.astype(np.float64).T if len(dets) else np.zeros((4, 0))
    boxes = np.stack(
        [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], 1
    )
    polygons = None if dets.masks is None else [mask_to_polygon(mask) for mask in dets.masks]
    text = format_yolo_lines(dets.labels, boxes, polygons)
    if not with_scores:
        return text
    return "".join(
        f"{line} {score:.{SCORE_DECIMALS}f}\n"
        for line, score in zip(text.splitlines(), dets.scores, strict=True)
    )


def instance_id_image(dets: Detections) -> np.ndarray:
    """(H, W) instance ids of a segmentation model's detections: 0 = background, i = detection i (1-based,
    in score order); where masks overlap the higher score wins. uint8, or uint16 above 255 detections."""
    height, width = dets.image_size
    ids = np.zeros((height, width), np.uint8 if len(dets) <= 255 else np.uint16)
    for i in range(len(dets) - 1, -1, -1):  # lowest score first: higher scores overwrite it
        ids[dets.masks[i]] = i + 1
    return ids


def save_id_png(path: Path, ids: np.ndarray) -> Path:
    """A one-channel PNG (8 or 16 bit, the array's dtype), written atomically."""
    ok, encoded = cv2.imencode(".png", ids)
    if not ok:
        raise ValueError(f"cannot encode the instance-id PNG {path}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(encoded.tobytes()))


def draw(image_rgb: np.ndarray, dets: Detections, class_names: list[str]) -> np.ndarray:
    """Masks (filled, semi-transparent, with contours; segmentation models) and then the boxes with tags."""
    if dets.masks is not None:
        image_rgb = draw_masks(image_rgb, dets.masks, dets.labels)
    return draw_detections(image_rgb, dets.boxes, dets.labels, dets.scores, class_names)


def crop_box(box: np.ndarray, width: int, height: int, padding: int | float) -> tuple[int, int, int, int]:
    """Pixel crop around a box with padding: int = pixels, float = fraction of the box's width/height."""
    x1, y1, x2, y2 = (float(v) for v in box)
    pad_x = padding * (x2 - x1) if isinstance(padding, float) else padding
    pad_y = padding * (y2 - y1) if isinstance(padding, float) else padding
    left, top = max(0, int(np.floor(x1 - pad_x))), max(0, int(np.floor(y1 - pad_y)))
    right, bottom = min(width, int(np.ceil(x2 + pad_x))), min(height, int(np.ceil(y2 + pad_y)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def crops(image_rgb: np.ndarray, dets: Detections, padding: int | float) -> Iterator[np.ndarray]:
    """Each detection's crop (H', W', 3) of the image, padded (crop_box), in the detections' order."""
    height, width = image_rgb.shape[:2]
    for box in dets.boxes:
        left, top, right, bottom = crop_box(box, width, height, padding)
        yield image_rgb[top:bottom, left:right]
