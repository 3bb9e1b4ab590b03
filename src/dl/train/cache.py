"""train.cache: decoded images, resized to the size they take inside the network input, kept in RAM or on disk.

Decoding a JPEG and shrinking it is most of a loader worker's time for a plain sample and 4x that for a
mosaic; with the cache each epoch after the first reads ready pixels. What is cached comes *before* any
augmentation, so every epoch still draws fresh mosaics, flips and colour changes.

    cache = build_image_cache(image_paths, img_size, keep_ratio, mode="ram", cache_dir=..., workers=2)
    image, (orig_w, orig_h) = cache.get(index)     # uint8 (h', w', 3), h' x w' = fit_size(orig) <= img_size

The cached size is fit_size(original) — what letterbox_or_resize shrinks to before padding — so letterboxing a
cached image only pads it and gives the same network input as the original image (bit for bit).
ram: refused before training when the images would not fit in the available memory (the size needed and the
size available are in the message). disk: one .npy per image under cache_dir/<input size>/, named by the
image's path, size and modification time, reused by later runs; refused when the disk is too small.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from loguru import logger

from src.common.errors import ConfigError
from src.common.hardware import disk_free_bytes, format_bytes, ram_available_bytes
from src.common.images import image_size, parallel_map, read_image_rgb
from src.common.io import atomic_write
from src.common.network_input import Letterbox, fit_size

CACHE_MODES = ("off", "ram", "disk")
RAM_SHARE = 0.8  # leave a fifth of the available memory to the model, the loader workers and the OS


def cache_mode(value) -> str:
    """train.cache -> off | ram | disk (YAML reads a bare `off` as false)."""
    mode = "off" if value in (False, None) else str(value).lower()
    if mode not in CACHE_MODES:
        raise ConfigError(f"train.cache must be one of {' | '.join(CACHE_MODES)}, got {value!r}")
    return mode


def fit_image(image: np.ndarray, img_size: Sequence[int], keep_ratio: bool) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h', w', 3) at fit_size: the content size inside the network input."""
    orig_h, orig_w = image.shape[:2]
    new_w, new_h = fit_size(orig_w, orig_h, int(img_size[1]), int(img_size[0]), keep_ratio)
    if (new_w, new_h) == (orig_w, orig_h):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


class ImageCache:
    """Fit-size images by item index, with their original (w, h) (val/test report boxes in the original)."""

    def __init__(self, mode: str, sizes: list[tuple[int, int]], images: list | None, files: list | None):
        self.mode, self.sizes, self.images, self.files = mode, sizes, images, files

    def get(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        image = self.images[index] if self.mode == "ram" else np.load(self.files[index])
        return image, self.sizes[index]


def _decode(path: Path, img_size: Sequence[int], keep_ratio: bool) -> tuple[np.ndarray, tuple[int, int]]:
    image = read_image_rgb(path)
    return fit_image(image, img_size, keep_ratio), (image.shape[1], image.shape[0])


def _bytes_needed(count: int, img_size: Sequence[int]) -> int:
    """An upper bound without opening a file: a cached image is never larger than the network input."""
    return count * int(img_size[0]) * int(img_size[1]) * 3


def _refuse_if_too_big(mode: str, needed: int, available: int | None, count: int, where: str) -> None:
    if available is not None and needed > available:
        other = "train.cache=disk" if mode == "ram" else "train.cache=ram"
        raise ConfigError(
            f"train.cache={mode}: {count} images need up to {format_bytes(needed)} but {where} has "
            f"{format_bytes(available)} available; use {other}, a smaller model.img_size, or train.cache=off"
        )


def check_cache_fits(mode: str, count: int, img_size: Sequence[int]) -> None:
    """train.cache=ram: refuse (ConfigError naming the size needed and available) before decoding anything,
    with an upper bound for `count` images. (disk checks the images it still has to write, per split.)"""
    if mode == "ram":
        available = ram_available_bytes()
        budget = None if available is None else int(available * RAM_SHARE)
        _refuse_if_too_big(mode, _bytes_needed(count, img_size), budget, count, "memory")


def from_original(meta: Letterbox, orig_w: int, orig_h: int) -> Letterbox:
    """The Letterbox of a cached (fit-size) image, restated for its original: the cached image only got
    padded, so the content scale is its size over the original's and the padding stays."""
    return Letterbox(
        meta.orig_w / orig_w * meta.scale_x,
        meta.orig_h / orig_h * meta.scale_y,
        meta.pad_x,
        meta.pad_y,
        orig_w,
        orig_h,
        meta.net_w,
        meta.net_h,
    )


def disk_cache_file(folder: Path, image: Path) -> Path:
    """The .npy for one image: its absolute path, size and mtime in the name, so an edited image misses."""
    stat = image.stat()
    key = f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return folder / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npy"


def _build_ram(paths, img_size, keep_ratio, workers) -> ImageCache:
    available = ram_available_bytes()
    budget = None if available is None else int(available * RAM_SHARE)
    _refuse_if_too_big("ram", _bytes_needed(len(paths), img_size), budget, len(paths), "memory")
    decoded = parallel_map(lambda p: _decode(p, img_size, keep_ratio), paths, workers, "caching images")
    return ImageCache("ram", [size for _, size in decoded], [image for image, _ in decoded], None)


def _save_npy(path: Path, image: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.save would add .npy to a temp file's name
        np.save(file, image)


def _build_disk(paths, img_size, keep_ratio, workers, cache_dir: Path) -> ImageCache:
    folder = (
        Path(cache_dir) / f"{int(img_size[0])}x{int(img_size[1])}_{'letterbox' if keep_ratio else 'resize'}"
    )
    files = [disk_cache_file(folder, Path(p)) for p in paths]
    missing = [i for i, file in enumerate(files) if not file.exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        needed = _bytes_needed(len(missing), img_size)
        _refuse_if_too_big("disk", needed, disk_free_bytes(folder), len(missing), f"the disk of {folder}")

    def size_of(index: int) -> tuple[int, int]:
        if index not in missing_set:
            return image_size(paths[index])  # (w, h) from the header, no decode
        image, size = _decode(paths[index], img_size, keep_ratio)
        atomic_write(files[index], lambda tmp: _save_npy(tmp, image))
        return size

    missing_set = set(missing)
    sizes = parallel_map(size_of, list(range(len(paths))), workers, "caching images")
    logger.info(
        f"train.cache=disk: {len(paths) - len(missing)} images reused, {len(missing)} written in {folder}"
    )
    return ImageCache("disk", sizes, None, files)


def build_image_cache(
    paths: Sequence[Path], img_size: Sequence[int], keep_ratio: bool, mode: str, cache_dir: Path, workers: int
) -> ImageCache | None:
    """The cache for one split (None for train.cache=off); decodes every missing image now, before training."""
    mode = cache_mode(mode)
    if mode == "off" or not paths:
        return None
    paths = [Path(p) for p in paths]
    workers = max(1, int(workers))
    if mode == "ram":
        cache = _build_ram(paths, img_size, keep_ratio, workers)
        held = sum(image.nbytes for image in cache.images)
        logger.info(f"train.cache=ram: {len(paths)} images in {format_bytes(held)} of memory")
        return cache
    return _build_disk(paths, img_size, keep_ratio, workers, cache_dir)
