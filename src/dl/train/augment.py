"""Training augmentations: an albumentations pipeline (one config key and probability per transform), a
4-image mosaic followed by a random affine, and DEIM's mixup of two samples.

Everything here works on one Sample = (RGB uint8 image, xyxy pixel boxes float32 (N, 4), labels int64 (N,)
[, masks uint8 (N, H, W), has_mask bool (N,)]). A segmentation sample carries one 0/1 mask per object at
the image's size, moved by every geometric transform exactly as its image (a box-only object, has_mask
False, has an empty mask); a detection sample has masks None and pays nothing for them. A background image
is simply N = 0 and goes through every transform unchanged in that respect.
The dataset then maps the result to the network input with src.common.network_input (the shared geometry).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import albumentations as A
import cv2
import numpy as np

from src.common.network_input import (
    PAD_VALUE,
    Letterbox,
    boxes_xyxy_to_network,
    fit_size,
    letterbox_or_resize,
)


class Sample(NamedTuple):
    """One training sample in the pixels of its (augmented) image. A plain (image, boxes, labels) tuple is
    a detection sample: Sample(*that) fills in None."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    labels: np.ndarray  # (N,) int64
    masks: np.ndarray | None = None  # (N, H, W) uint8 0/1, segmentation only
    has_mask: np.ndarray | None = None  # (N,) bool: False for a box-only object (empty mask, no mask loss)

    def select(self, keep: np.ndarray) -> Sample:
        """The sample with only the objects `keep` (bool (N,) or indices) selects, in that order."""
        return self._replace(
            boxes=self.boxes[keep],
            labels=self.labels[keep],
            masks=None if self.masks is None else self.masks[keep],
            has_mask=None if self.has_mask is None else self.has_mask[keep],
        )


# Albumentations drops a box that keeps less than this fraction of its area inside the image (rotations).
MIN_VISIBILITY = 0.1
MIN_BOX_PX = 1.0


def empty_boxes() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


# ---------------------------------------------------------------- instance masks

CV_MAX_CHANNELS = 512  # OpenCV's limit on channels per array (CV_CN_MAX)


def map_masks(
    masks: np.ndarray, op: Callable[[np.ndarray], np.ndarray], out_hw: tuple[int, int]
) -> np.ndarray:
    """Apply an OpenCV op on (H, W, C) to masks (N, H, W) uint8, up to 512 channels at a time -> (N, h, w).

    The masks are 0/1 uint8 and every op here interpolates linearly: OpenCV rounds the result, so a pixel
    is in a mask when the bilinear blend of its neighbours is >= 0.5 (thin parts survive a shrink better than
    with nearest, and there is no half-pixel shift)."""
    out = np.zeros((len(masks), *out_hw), np.uint8)
    for start in range(0, len(masks), CV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(masks[start : start + CV_MAX_CHANNELS].transpose(1, 2, 0))
        moved = op(chunk).reshape(*out_hw, -1)  # OpenCV drops a single channel's axis
        out[start : start + CV_MAX_CHANNELS] = moved.transpose(2, 0, 1)
    return out


def resize_masks(masks: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """(N, H, W) -> (N, h, w) uint8, size_wh = (w, h)."""
    if masks.shape[1:] == (size_wh[1], size_wh[0]):
        return masks
    return map_masks(
        masks, lambda m: cv2.resize(m, size_wh, interpolation=cv2.INTER_LINEAR), (size_wh[1], size_wh[0])
    )


def warp_masks(masks: np.ndarray, matrix: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Masks (N, H, W) through the affine `matrix` (3x3 or 2x3) into (N, h, w); outside = 0."""
    return map_masks(
        masks,
        lambda m: cv2.warpAffine(m, matrix[:2], size_wh, flags=cv2.INTER_LINEAR, borderValue=0),
        (size_wh[1], size_wh[0]),
    )


def letterbox_masks(masks: np.ndarray, meta: Letterbox) -> np.ndarray:
    """Masks (N, orig_h, orig_w) -> (N, net_h, net_w) with the geometry letterbox_or_resize gave the image
    (content scaled by the same rounded size, padding = no object)."""
    content_w, content_h = round(meta.orig_w * meta.scale_x), round(meta.orig_h * meta.scale_y)
    resized = resize_masks(masks, (content_w, content_h))
    out = np.zeros((len(masks), meta.net_h, meta.net_w), np.uint8)
    x0, y0 = int(meta.pad_x), int(meta.pad_y)
    out[:, y0 : y0 + content_h, x0 : x0 + content_w] = resized
    return out


def polygons_to_network(polygons: Sequence[np.ndarray | None], meta: Letterbox) -> list[np.ndarray | None]:
    """Polygons normalised in the original image -> normalised in the network input (None stays None)."""
    scale = np.array([meta.orig_w * meta.scale_x / meta.net_w, meta.orig_h * meta.scale_y / meta.net_h])
    offset = np.array([meta.pad_x / meta.net_w, meta.pad_y / meta.net_h])
    return [None if p is None else (p * scale + offset).astype(np.float32) for p in polygons]


def boxes_from_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight xyxy pixel boxes (N, 4) float32 around each mask's pixels, and which masks are not empty (N,)."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (N, H), (N, W)
    present = rows.any(axis=1)
    y1, x1 = rows.argmax(axis=1), cols.argmax(axis=1)
    y2 = masks.shape[1] - rows[:, ::-1].argmax(axis=1)
    x2 = masks.shape[2] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).reshape(-1, 4), present


def fit_boxes_to_masks(sample: Sample) -> Sample:
    """After geometric transforms: each object with a mask gets the box of its mask's pixels (a rotation or
    shear leaves the corner-transformed box loose), and an object whose mask vanished (moved out, or shrunk
    below a pixel) is dropped with its box. Box-only objects (has_mask False) keep their box."""
    if sample.masks is None or len(sample.labels) == 0:
        return sample
    mask_boxes, present = boxes_from_masks(sample.masks)
    boxes = np.where(sample.has_mask[:, None], mask_boxes, sample.boxes).astype(np.float32)
    return sample._replace(boxes=boxes).select(present | ~sample.has_mask)


# ---------------------------------------------------------------- albumentations


def build_augmentations(augs: Mapping, seed: int | None = None):
    """albumentations Compose for training (None when every probability is 0).

    Boxes are pascal_voc (xyxy pixels), clipped to the image; labels travel in `class_labels`.
    """

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
        label_fields=["object_index"],  # which input object each kept box is (labels, masks follow it)
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


def apply_augmentations(
    transform,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None = None,
    has_mask: np.ndarray | None = None,
) -> Sample:
    """Run the albumentations pipeline; returns boxes float32 (N, 4) and labels int64 (N,) always.

    Each object travels as its index (a label field), so the labels, masks and has_mask of the boxes
    albumentations keeps are picked by it; masks go through the same flips and rotations (nearest, 0
    outside), pixel-level transforms leave them alone.
    """
    sample = Sample(
        image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64).reshape(-1)
    )
    sample = sample._replace(masks=masks, has_mask=has_mask)
    if transform is None:
        return sample
    inputs = {"image": image, "bboxes": sample.boxes, "object_index": np.arange(len(sample.labels))}
    if masks is not None and len(masks):
        inputs["masks"] = masks
    out = transform(**inputs)
    index = np.rint(np.asarray(out["object_index"], np.float64)).astype(np.int64).reshape(-1)
    out_image = np.ascontiguousarray(out["image"])
    out_masks = None
    if masks is not None:
        out_masks = (
            np.asarray(out["masks"], np.uint8)
            if len(masks)
            else np.zeros((0, *out_image.shape[:2]), np.uint8)
        )
    moved = Sample(out_image, sample.boxes, sample.labels, out_masks, has_mask).select(index)
    return moved._replace(boxes=np.asarray(out["bboxes"], np.float32).reshape(-1, 4))


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
    def from_mapping(cls, mosaic: Mapping) -> MosaicParams:
        """From train.mosaic's keys (the stage hands them over as a plain dict)."""
        return cls(
            scale=tuple(float(s) for s in mosaic["scale"]),
            degrees=float(mosaic["degrees"]),
            translate=float(mosaic["translate"]),
            shear=float(mosaic["shear"]),
            min_box_px=float(mosaic["min_box_px"]),
            min_area_ratio=float(mosaic["min_area_ratio"]),
        )


def _visible_part(tile_hw: tuple[int, int], quadrant: int, xc: int, yc: int, canvas_hw: tuple[int, int]):
    """Where _place_tile puts a tile: its offset (x0, y0) and the canvas window (cx1, cy1, cx2, cy2) it shows
    in (empty when cx2 <= cx1 or cy2 <= cy1)."""
    (tile_h, tile_w), (canvas_h, canvas_w) = tile_hw, canvas_hw
    x0 = xc - tile_w if quadrant in (0, 2) else xc
    y0 = yc - tile_h if quadrant in (0, 1) else yc
    return (x0, y0), (max(x0, 0), max(y0, 0), min(x0 + tile_w, canvas_w), min(y0 + tile_h, canvas_h))


def _place_tile(canvas: np.ndarray, tile: np.ndarray, quadrant: int, xc: int, yc: int) -> tuple[int, int]:
    """Paste `tile` with one corner at the mosaic centre (xc, yc); returns the tile's (x, y) offset.

    Quadrants: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right of the centre. Parts falling outside
    the canvas are cut off.
    """
    (x0, y0), (cx1, cy1, cx2, cy2) = _visible_part(tile.shape[:2], quadrant, xc, yc, canvas.shape[:2])
    if cx2 > cx1 and cy2 > cy1:
        canvas[cy1:cy2, cx1:cx2] = tile[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
    return x0, y0


def _mosaic_masks(
    samples: Sequence[Sample], tiles: list, canvas_hw: tuple[int, int], matrix: np.ndarray, out_hw
) -> np.ndarray:
    """Each tile's masks resized like its image, cut to the part of the tile the canvas shows, and warped
    by the mosaic's affine straight into the (out_h, out_w) output (no (2h, 2w) canvas per object)."""
    out_h, out_w = out_hw
    warped = []
    for sample, (quadrant, xc, yc, new_w, new_h) in zip(samples, tiles, strict=True):
        masks = resize_masks(sample.masks, (new_w, new_h))
        (x0, y0), (cx1, cy1, cx2, cy2) = _visible_part((new_h, new_w), quadrant, xc, yc, canvas_hw)
        if len(masks) == 0 or cx2 <= cx1 or cy2 <= cy1:
            warped.append(np.zeros((len(masks), out_h, out_w), np.uint8))
            continue
        visible = masks[:, cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
        shift = np.array([[1, 0, cx1], [0, 1, cy1], [0, 0, 1]], np.float64)  # visible part -> canvas
        warped.append(warp_masks(visible, matrix @ shift, (out_w, out_h)))
    return np.concatenate(warped)


def make_mosaic(
    samples: Sequence[Sample],
    img_size: Sequence[int],
    keep_ratio: bool,
    params: MosaicParams,
    rng: np.random.Generator,
) -> Sample:
    """Four samples -> one (h, w) image: each resized like the network input, tiled around a random centre
    on a (2h, 2w) grey canvas, then a random affine (scale/rotate/shear/translate) back to (h, w). Masks
    (segmentation samples) follow their tiles and the affine."""
    if len(samples) != 4:
        raise ValueError(f"a mosaic needs 4 samples, got {len(samples)}")
    samples = [Sample(*sample) for sample in samples]
    net_h, net_w = int(img_size[0]), int(img_size[1])
    canvas = np.full((2 * net_h, 2 * net_w, 3), PAD_VALUE, dtype=np.uint8)
    xc = int(rng.uniform(0.5 * net_w, 1.5 * net_w))
    yc = int(rng.uniform(0.5 * net_h, 1.5 * net_h))
    all_boxes, all_labels, tiles = [], [], []
    for quadrant, (image, boxes, labels, *_) in enumerate(samples):
        orig_h, orig_w = image.shape[:2]
        new_w, new_h = fit_size(orig_w, orig_h, net_w, net_h, keep_ratio)
        tile = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        x0, y0 = _place_tile(canvas, tile, quadrant, xc, yc)
        tiles.append((quadrant, xc, yc, new_w, new_h))
        scaled = np.asarray(boxes, np.float32).reshape(-1, 4) * np.array(
            [new_w / orig_w, new_h / orig_h] * 2, np.float32
        )
        all_boxes.append(scaled + np.array([x0, y0, x0, y0], np.float32))
        all_labels.append(np.asarray(labels, np.int64).reshape(-1))
    boxes = np.concatenate(all_boxes)
    # Clip to the canvas first: what was cut off when tiling is not part of the object any more.
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, 2 * net_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, 2 * net_h)
    on_canvas = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    matrix, scale = affine_matrix(canvas.shape[:2], (net_h, net_w), params, rng)
    masks = has_mask = None
    if samples[0].masks is not None:
        masks = _mosaic_masks(samples, tiles, canvas.shape[:2], matrix, (net_h, net_w))
        has_mask = np.concatenate([sample.has_mask for sample in samples])
    mosaic = Sample(canvas, boxes, np.concatenate(all_labels), masks, has_mask)
    return _warp_sample(mosaic.select(on_canvas), matrix, scale, (net_h, net_w), params, masks_done=True)


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
    masks: np.ndarray | None = None,
    has_mask: np.ndarray | None = None,
) -> Sample:
    """Warp image, boxes (and masks) with a random affine into an (out_h, out_w) image; drop boxes that got
    too small or mostly left the picture."""
    out_h, out_w = int(out_size[0]), int(out_size[1])
    matrix, scale = affine_matrix(image.shape[:2], (out_h, out_w), params, rng)
    sample = Sample(
        image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64).reshape(-1)
    )
    return _warp_sample(
        sample._replace(masks=masks, has_mask=has_mask), matrix, scale, (out_h, out_w), params
    )


def _warp_sample(
    sample: Sample, matrix: np.ndarray, scale: float, out_hw, params: MosaicParams, masks_done: bool = False
) -> Sample:
    """The affine `matrix` applied to image, boxes and (unless masks_done: already warped) masks; boxes
    that got too small or mostly left the picture are dropped with their objects."""
    out_h, out_w = out_hw
    warped = cv2.warpAffine(
        sample.image,
        matrix[:2],
        (out_w, out_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    moved = transform_boxes(sample.boxes, matrix)
    moved[:, 0::2] = moved[:, 0::2].clip(0, out_w)
    moved[:, 1::2] = moved[:, 1::2].clip(0, out_h)
    keep = keep_box_candidates(sample.boxes, moved, scale, params.min_box_px, params.min_area_ratio)
    masks = sample.masks
    if masks is not None and not masks_done:
        masks = warp_masks(masks, matrix, (out_w, out_h))
    return Sample(warped, moved, sample.labels, masks, sample.has_mask).select(keep)


# ---------------------------------------------------------------- mixup (DEIM)

MIXUP_RATIO_RANGE = (0.45, 0.55)  # DEIM's BatchImageCollateFunction: weight of the first image


def mix_up(first: Sample, second: Sample, img_size: Sequence[int], keep_ratio: bool, ratio: float) -> Sample:
    """Blend two samples into one (h, w) picture: ratio * first + (1 - ratio) * second, keeping every box
    (and mask) of both (DEIM's mixup; its criterion does not weight the boxes by the ratio, so neither do we).

    Both images are first brought to the network input with the shared geometry (letterbox or resize), so
    their boxes land where the network sees them. Returns image (h, w, 3) uint8, boxes (N1 + N2, 4) xyxy px,
    labels (N1 + N2,)[, masks (N1 + N2, h, w), has_mask].
    """
    pictures, parts = [], []
    for sample in (Sample(*first), Sample(*second)):
        resized, meta = letterbox_or_resize(sample.image, img_size, keep_ratio)
        pictures.append(resized.astype(np.float32))
        boxes = boxes_xyxy_to_network(np.asarray(sample.boxes, np.float32).reshape(-1, 4), meta)
        masks = None if sample.masks is None else letterbox_masks(sample.masks, meta)
        parts.append(
            Sample(resized, boxes, np.asarray(sample.labels, np.int64).reshape(-1), masks, sample.has_mask)
        )
    blended = ratio * pictures[0] + (1.0 - ratio) * pictures[1]
    image = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    segment = parts[0].masks is not None
    return Sample(
        image,
        np.concatenate([p.boxes for p in parts]).astype(np.float32),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.masks for p in parts]) if segment else None,
        np.concatenate([p.has_mask for p in parts]) if segment else None,
    )
