"""Training augmentations: an albumentations pipeline (one config key and probability per transform), a
4-image mosaic followed by a random affine, and DEIM's mixup of two samples.

Everything here works on one sample = (RGB uint8 image, xyxy pixel boxes float32 (N, 4), labels int64 (N,)).
A background image is simply N = 0 and goes through every transform unchanged in that respect.
The dataset then maps the result to the network input with src.common.network_input (the shared geometry).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from omegaconf import DictConfig

from src.common.network_input import PAD_VALUE, boxes_xyxy_to_network, fit_size, letterbox_or_resize

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]  # image (H, W, 3) uint8, boxes (N, 4) xyxy px, labels (N,)

# Albumentations drops a box that keeps less than this fraction of its area inside the image (rotations).
MIN_VISIBILITY = 0.1
MIN_BOX_PX = 1.0


def empty_boxes() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


# ---------------------------------------------------------------- albumentations


def build_augmentations(augs: DictConfig | dict, seed: int | None = None):
    """albumentations Compose for training (None when every probability is 0).

    Boxes are pascal_voc (xyxy pixels), clipped to the image; labels travel in `class_labels`.
    """
    import albumentations as A

    transforms = []

    def add(prob: float, make: Callable[[float], object]) -> None:
        if float(prob) > 0:
            transforms.append(make(float(prob)))

    add(augs["left_right_flip"], lambda p: A.HorizontalFlip(p=p))
    add(augs["up_down_flip"], lambda p: A.VerticalFlip(p=p))
    add(augs["rotate_90"], lambda p: A.RandomRotate90(p=p))
    if float(augs["rotation_degree"]) > 0:
        limit = float(augs["rotation_degree"])
        add(
            augs["rotation_p"],
            lambda p: A.Rotate(
                limit=limit,
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_CONSTANT,
                fill=PAD_VALUE,
                p=p,
            ),
        )
    add(augs["brightness_contrast"], lambda p: A.RandomBrightnessContrast(p=p))
    add(augs["gamma"], lambda p: A.RandomGamma(p=p))
    add(augs["blur"], lambda p: A.Blur(blur_limit=(3, 5), p=p))
    add(augs["noise"], lambda p: A.GaussNoise(std_range=(0.02, 0.1), p=p))
    add(augs["to_gray"], lambda p: A.ToGray(p=p))
    add(
        augs["coarse_dropout"],
        lambda p: A.CoarseDropout(
            num_holes_range=(1, 4),
            hole_height_range=(0.05, 0.15),
            hole_width_range=(0.05, 0.15),
            fill=PAD_VALUE,
            p=p,
        ),
    )
    if not transforms:
        return None
    bbox_params = A.BboxParams(
        format="pascal_voc",
        label_fields=["class_labels"],
        min_visibility=MIN_VISIBILITY,
        min_width=MIN_BOX_PX,
        min_height=MIN_BOX_PX,
        clip=True,
        filter_invalid_bboxes=True,
    )
    with warnings.catch_warnings():
        # With only pixel-level transforms albumentations warns that boxes have nothing to do: harmless.
        warnings.filterwarnings("ignore", message="Got processor for bboxes", category=UserWarning)
        return A.Compose(transforms, bbox_params=bbox_params, seed=seed)


def apply_augmentations(transform, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> Sample:
    """Run the albumentations pipeline; returns boxes float32 (N, 4) and labels int64 (N,) always.

    Labels go in as an int64 numpy array (a list of ints may come back as floats), and come back cast to
    int64 in any case, also for the empty (background) case where albumentations returns a list.
    """
    if transform is None:
        return image, boxes, labels
    out = transform(
        image=image,
        bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        class_labels=np.asarray(labels, np.int64).reshape(-1),
    )
    out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
    out_labels = np.rint(np.asarray(out["class_labels"], np.float64)).astype(np.int64).reshape(-1)
    return np.ascontiguousarray(out["image"]), out_boxes, out_labels


# ---------------------------------------------------------------- mosaic + random affine


@dataclass(frozen=True)
class MosaicParams:
    scale: tuple[float, float] = (0.5, 1.5)
    degrees: float = 0.0
    translate: float = 0.2
    shear: float = 2.0
    min_box_px: float = 2.0  # boxes narrower/shorter than this (network pixels) after the affine are dropped
    min_area_ratio: float = 0.1  # ... and those keeping less than this share of their (scaled) area

    @classmethod
    def from_cfg(cls, mosaic: DictConfig | dict) -> MosaicParams:
        return cls(
            scale=tuple(float(s) for s in mosaic["scale"]),
            degrees=float(mosaic["degrees"]),
            translate=float(mosaic["translate"]),
            shear=float(mosaic["shear"]),
            min_box_px=float(mosaic["min_box_px"]),
            min_area_ratio=float(mosaic["min_area_ratio"]),
        )


def _place_tile(canvas: np.ndarray, tile: np.ndarray, quadrant: int, xc: int, yc: int) -> tuple[int, int]:
    """Paste `tile` with one corner at the mosaic centre (xc, yc); returns the tile's (x, y) offset.

    Quadrants: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right of the centre. Parts falling outside
    the canvas are cut off.
    """
    tile_h, tile_w = tile.shape[:2]
    x0 = xc - tile_w if quadrant in (0, 2) else xc
    y0 = yc - tile_h if quadrant in (0, 1) else yc
    canvas_h, canvas_w = canvas.shape[:2]
    cx1, cy1 = max(x0, 0), max(y0, 0)
    cx2, cy2 = min(x0 + tile_w, canvas_w), min(y0 + tile_h, canvas_h)
    if cx2 > cx1 and cy2 > cy1:
        canvas[cy1:cy2, cx1:cx2] = tile[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
    return x0, y0


def make_mosaic(
    samples: Sequence[Sample],
    img_size: Sequence[int],
    keep_ratio: bool,
    params: MosaicParams,
    rng: np.random.Generator,
) -> Sample:
    """Four samples -> one (h, w) image: each resized like the network input, tiled around a random centre
    on a (2h, 2w) grey canvas, then a random affine (scale/rotate/shear/translate) back to (h, w)."""
    if len(samples) != 4:
        raise ValueError(f"a mosaic needs 4 samples, got {len(samples)}")
    net_h, net_w = int(img_size[0]), int(img_size[1])
    canvas = np.full((2 * net_h, 2 * net_w, 3), PAD_VALUE, dtype=np.uint8)
    xc = int(rng.uniform(0.5 * net_w, 1.5 * net_w))
    yc = int(rng.uniform(0.5 * net_h, 1.5 * net_h))
    all_boxes, all_labels = [], []
    for quadrant, (image, boxes, labels) in enumerate(samples):
        orig_h, orig_w = image.shape[:2]
        new_w, new_h = fit_size(orig_w, orig_h, net_w, net_h, keep_ratio)
        tile = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        x0, y0 = _place_tile(canvas, tile, quadrant, xc, yc)
        scaled = np.asarray(boxes, np.float32).reshape(-1, 4) * np.array(
            [new_w / orig_w, new_h / orig_h] * 2, np.float32
        )
        all_boxes.append(scaled + np.array([x0, y0, x0, y0], np.float32))
        all_labels.append(np.asarray(labels, np.int64).reshape(-1))
    boxes = np.concatenate(all_boxes)
    labels = np.concatenate(all_labels)
    # Clip to the canvas first: what was cut off when tiling is not part of the object any more.
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, 2 * net_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, 2 * net_h)
    keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    return random_affine(canvas, boxes[keep], labels[keep], (net_h, net_w), params, rng)


def affine_matrix(
    in_size: tuple[int, int], out_size: tuple[int, int], params: MosaicParams, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """3x3 matrix taking the centre of an (in_h, in_w) image to a random spot near the centre of the
    (out_h, out_w) output, with random rotation, scale and shear. Returns (matrix, scale)."""
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    to_origin = np.array([[1, 0, -in_w / 2], [0, 1, -in_h / 2], [0, 0, 1]], dtype=np.float64)
    angle = rng.uniform(-params.degrees, params.degrees)
    scale = rng.uniform(params.scale[0], params.scale[1])
    rotate = np.eye(3)
    rotate[:2] = cv2.getRotationMatrix2D((0, 0), angle, scale)
    shear = np.eye(3)
    shear[0, 1] = math.tan(math.radians(rng.uniform(-params.shear, params.shear)))
    shear[1, 0] = math.tan(math.radians(rng.uniform(-params.shear, params.shear)))
    tx = out_w * (0.5 + rng.uniform(-params.translate, params.translate))
    ty = out_h * (0.5 + rng.uniform(-params.translate, params.translate))
    to_output = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=np.float64)
    return to_output @ shear @ rotate @ to_origin, scale


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """xyxy boxes (N, 4) -> the xyxy boxes enclosing their 4 transformed corners (N, 4)."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32)
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1]), np.stack([x2, y1]), np.stack([x1, y2]), np.stack([x2, y2])])
    corners = corners.transpose(2, 0, 1)  # (N, 4 corners, 2)
    moved = corners @ matrix[:2, :2].T + matrix[:2, 2]
    return np.concatenate([moved.min(axis=1), moved.max(axis=1)], axis=1).astype(np.float32)


def keep_box_candidates(
    before: np.ndarray, after: np.ndarray, scale: float, min_box_px: float, min_area_ratio: float
) -> np.ndarray:
    """Boolean mask of boxes worth keeping after a geometric transform + clipping: at least min_box_px wide
    and high, and at least min_area_ratio of their expected (scaled) area still visible."""
    width, height = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    area_before = (before[:, 2] - before[:, 0]) * (before[:, 3] - before[:, 1]) * scale**2
    big_enough = (width >= min_box_px) & (height >= min_box_px)
    return big_enough & (width * height >= min_area_ratio * np.maximum(area_before, 1e-9))


def random_affine(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    out_size: Sequence[int],
    params: MosaicParams,
    rng: np.random.Generator,
) -> Sample:
    """Warp image and boxes with a random affine into an (out_h, out_w) image; drop boxes that got too
    small or mostly left the picture."""
    out_h, out_w = int(out_size[0]), int(out_size[1])
    matrix, scale = affine_matrix(image.shape[:2], (out_h, out_w), params, rng)
    warped = cv2.warpAffine(
        image,
        matrix[:2],
        (out_w, out_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    moved = transform_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), matrix)
    moved[:, 0::2] = moved[:, 0::2].clip(0, out_w)
    moved[:, 1::2] = moved[:, 1::2].clip(0, out_h)
    keep = keep_box_candidates(boxes.reshape(-1, 4), moved, scale, params.min_box_px, params.min_area_ratio)
    return warped, moved[keep], np.asarray(labels, np.int64).reshape(-1)[keep]


# ---------------------------------------------------------------- mixup (DEIM)

MIXUP_RATIO_RANGE = (0.45, 0.55)  # DEIM's BatchImageCollateFunction: weight of the first image


def mix_up(first: Sample, second: Sample, img_size: Sequence[int], keep_ratio: bool, ratio: float) -> Sample:
    """Blend two samples into one (h, w) picture: ratio * first + (1 - ratio) * second, keeping every box of
    both (DEIM's mixup; its criterion does not weight the boxes by the ratio, so neither do we).

    Both images are first brought to the network input with the shared geometry (letterbox or resize), so
    their boxes land where the network sees them. Returns image (h, w, 3) uint8, boxes (N1 + N2, 4) xyxy px,
    labels (N1 + N2,).
    """
    pictures, all_boxes, all_labels = [], [], []
    for image, boxes, labels in (first, second):
        resized, meta = letterbox_or_resize(image, img_size, keep_ratio)
        pictures.append(resized.astype(np.float32))
        all_boxes.append(boxes_xyxy_to_network(np.asarray(boxes, np.float32).reshape(-1, 4), meta))
        all_labels.append(np.asarray(labels, np.int64).reshape(-1))
    blended = ratio * pictures[0] + (1.0 - ratio) * pictures[1]
    image = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return image, np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_labels)
