"""Synthetic images for near-duplicate search: unrelated scenes of one kind, and planted altered copies
(tests/test_etl_near_duplicates.py and benchmarks/near_duplicates.py)."""

from __future__ import annotations

import functools

import cv2
import numpy as np

# What an image of each kind is: demo scenes with shapes, the same without shapes (textured background +
# clutter), smooth two-colour gradients under weak blotches (little structure: unrelated ones share a coarse
# picture), and labelled images of the demo data's sizes.
KINDS = ("scene", "background", "smooth", "labelled")


@functools.cache
def _demo_settings():
    from src.common.config import default_config

    return default_config().demo_data


def scene(index: int, seed: int = 0, size: tuple[int, int] = (480, 640), kind: str = "scene") -> np.ndarray:
    """One image of `kind` (KINDS), RGB (h, w, 3); `labelled` images take their own size (256-512 a side)."""
    from src.etl.make_demo_data import SHAPES, finish, make_scene

    rng = np.random.default_rng([seed, index, KINDS.index(kind)])
    if kind == "labelled":
        size = (int(rng.integers(256, 513)), int(rng.integers(256, 513)))
    if kind == "smooth":
        return finish(rng, smooth_background(rng, *size))
    objects = int(rng.integers(1, 6)) if kind in ("scene", "labelled") else 0
    image, _ = make_scene(rng, size[0], size[1], list(SHAPES), objects, _demo_settings())
    return image


def smooth_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A strong gradient between two random colours under weak colour blotches and pixel noise (H, W, 3)."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs / width * np.cos(angle) + ys / height * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
    blotches = rng.normal(0, rng.uniform(2, 12), (rng.integers(3, 8), rng.integers(3, 8), 3))
    image += cv2.resize(blotches.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(2, 6)
    return np.clip(image, 0, 255).astype(np.uint8)


def planted_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A re-encoded, resized, cropped, brightened and maybe mirrored copy of an RGB image."""
    h, w = image.shape[:2]
    crop = rng.uniform(0, 0.10, 2)  # share of width / height cut away, split between the two sides
    dx, dy = int(w * crop[0]), int(h * crop[1])
    left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    out = image[top : h - (dy - top), left : w - (dx - left)]
    scale = rng.uniform(0.5, 2.0)
    out = cv2.resize(out, (max(8, int(out.shape[1] * scale)), max(8, int(out.shape[0] * scale))))
    out = np.clip(out.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    ok, data = cv2.imencode(
        ".jpg", np.ascontiguousarray(out), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 91))]
    )
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
