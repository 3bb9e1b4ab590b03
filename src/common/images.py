"""Image files: which extensions count, listing a folder, and reading any of them as 8-bit RGB.

Every stage that opens a user's image (preprocess, check, train, infer, demo) goes through `read_image_rgb`,
so a photo looks the same everywhere: EXIF orientation applied, transparency composited on white,
grayscale / CMYK / 16-bit / palette images turned into plain uint8 RGB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
HEIF_EXTS = frozenset({".heic", ".heif"})

T = TypeVar("T")
R = TypeVar("R")

# EXIF orientations 5..8 rotate by 90 degrees, so the displayed width and height are swapped.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


class ImageReadError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, unknown format). The message names the file."""


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def _list_files(folder: str | Path, exts: frozenset[str], recursive: bool) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    # Hidden files are skipped: our own atomic-write temp files (.name.tmp) and macOS "._x.jpg" litter.
    return sorted(
        p
        for p in candidates
        if p.is_file()
        and p.suffix.lower() in exts
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (any letter case of IMAGE_EXTS), sorted by path."""
    return _list_files(folder, IMAGE_EXTS, recursive)


def list_videos(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Video files in `folder` (any letter case of VIDEO_EXTS), sorted by path."""
    return _list_files(folder, VIDEO_EXTS, recursive)


@functools.cache
def _register_heif() -> None:
    # pillow-heif plugs HEIC/HEIF decoding into PIL; imported only when such a file shows up (slow import).
    from pillow_heif import register_heif_opener

    register_heif_opener()


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image with PIL (raises ImageReadError naming the file)."""
    path = Path(path)
    if path.suffix.lower() in HEIF_EXTS:
        _register_heif()
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not later in a dataloader worker
    except FileNotFoundError:
        raise
    except UnidentifiedImageError as err:
        raise ImageReadError(
            f"cannot read image {path}: not a known image format or the file is corrupt"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"cannot read image {path}: too many pixels ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise read_error(path, err) from err
    return image


def read_error(path: str | Path, err: Exception) -> ImageReadError:
    """A decoder's exception as an ImageReadError naming the file, in words a user understands."""
    if isinstance(err, ImageReadError):
        return err
    reason = "the file is truncated" if "truncated" in str(err).lower() else str(err)
    return ImageReadError(f"cannot read image {path}: {reason}")


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1 = upright, also when there is no EXIF)."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # broken EXIF blocks are common; treat as upright like every viewer does
        return 1


def _high_depth_to_uint8(array: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit int / float pixels -> uint8, scaled by the value range the type implies."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32))
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0  # floats in [0, 1] vs already 0..255
        return np.clip(array * scale, 0, 255).astype(np.uint8)
    # Integers: 16-bit data (PIL mode I;16 or I) is scaled 0..65535 -> 0..255; 8-bit data stored wide stays.
    peak = int(array.max(initial=0))
    if peak <= 255:
        return array.astype(np.uint8)
    return np.clip(array.astype(np.float64) / 257.0, 0, 255).round().astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on WHITE (not dropped): transparent pixels often
    store black, so dropping alpha would turn e.g. a logo or scanned page on a transparent background black."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        gray = _high_depth_to_uint8(np.asarray(image))
        return Image.fromarray(gray.squeeze(), mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _read_with_opencv(path: Path) -> np.ndarray | None:
    """Fallback for what PIL cannot open (e.g. 16-bit RGB TIFF). OpenCV applies EXIF orientation here."""

    array = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_COLOR)
    if array is None:
        return None
    return np.ascontiguousarray(_high_depth_to_uint8(array)[..., ::-1])  # BGR -> RGB


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read any supported image as uint8 RGB (H, W, 3) with EXIF orientation applied.

    Raises FileNotFoundError if missing and ImageReadError (naming the file) if unreadable or truncated.
    """
    path = Path(path)
    try:
        image = open_image(path)
    except ImageReadError as err:
        # Only a format PIL does not know gets a second try (exotic TIFF flavours); a truncated file stays an error.
        pil_unknown = isinstance(err.__cause__, UnidentifiedImageError)
        fallback = (
            _read_with_opencv(path) if pil_unknown and path.suffix.lower() in {".tif", ".tiff"} else None
        )
        if fallback is None:
            raise
        return fallback
    return upright_rgb(image)


def upright_rgb(image: Image.Image) -> np.ndarray:
    """A decoded PIL image -> uint8 RGB (H, W, 3) with its EXIF orientation applied."""
    image = ImageOps.exif_transpose(image) if exif_orientation(image) != 1 else image
    return np.ascontiguousarray(np.asarray(pil_to_rgb(image), dtype=np.uint8))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, read from the header (no full decode)."""
    path = Path(path)
    if path.suffix.lower() in HEIF_EXTS:
        _register_heif()
    try:
        with Image.open(path) as image:
            width, height = image.size
            if exif_orientation(image) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            return width, height
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        rgb = _read_with_opencv(path)
        if rgb is None:
            raise read_error(path, err) from err
        return rgb.shape[1], rgb.shape[0]


def parallel_map(
    fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str, processes: bool = False
) -> list[R]:
    """fn over items with a tqdm bar, results in input order; serial when workers <= 1.

    processes=False: threads. PIL/OpenCV/hashlib release the GIL for much of their decoding and hashing, threads
    start instantly, and they are safe inside a process that already runs torch (forking one can hang).
    processes=True: a process pool, for CPU-heavy per-file work in a stage's own process (fn and items must
    pickle: a module-level function or a bound method of a simple object).
    """


    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, unit="file", leave=False)]
    pool_type = ProcessPoolExecutor if processes else ThreadPoolExecutor
    with pool_type(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="file", leave=False))
