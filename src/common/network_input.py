"""The one network-input geometry shared by training, evaluation and every inference backend.

Training, validation, torch / ONNX / OpenVINO / TensorRT inference all go through these functions, so a box
means the same thing everywhere:

    resized, meta = letterbox_or_resize(image_rgb, img_size=(h, w), keep_ratio=cfg.model.keep_ratio)
    batch = to_model_input([resized])                       # (1, 3, h, w) float32 in [0, 1]
    outputs = model(torch.from_numpy(batch))
    # Give the postprocessor the NETWORK input size (w, h), never the original size: it returns xyxy boxes
    # in network-input pixels ...
    results = postprocessor(outputs, torch.tensor([[meta.net_w, meta.net_h]]))
    # ... and only this function maps them back (undoing padding and scale, clipping to the image):
    boxes = boxes_to_original(results[0]["boxes"], meta)
    # A segmentation model's low-resolution mask logits of the kept queries -> masks of the original image:
    masks = masks_to_original(results[0]["masks"], meta)    # bool (K, orig_h, orig_w)

keep_ratio=True letterboxes: scale to fit, pad with grey 114 on both sides (centred).
keep_ratio=False resizes plainly (the aspect ratio may change; no padding).
Resizing is always cv2.INTER_LINEAR (also when shrinking), the same as at export and inference time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

PAD_VALUE = 114  # grey used for letterbox padding and for empty canvas areas (mosaic, rotations)


@dataclass(frozen=True)
class Letterbox:
    """How an original image was mapped to the network input: net = orig * scale + pad (per axis, pixels)."""

    scale_x: float
    scale_y: float
    pad_x: float  # left padding in network pixels
    pad_y: float  # top padding in network pixels
    orig_w: int
    orig_h: int
    net_w: int
    net_h: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def identity(cls, width: int, height: int) -> Letterbox:
        """For an image that already is the network input (e.g. a mosaic built at the network size)."""
        return cls(1.0, 1.0, 0.0, 0.0, width, height, width, height)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an RGB image array of shape (H, W, 3), got {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has no pixels: shape {image.shape}")


def fit_size(orig_w: int, orig_h: int, net_w: int, net_h: int, keep_ratio: bool) -> tuple[int, int]:
    """Size (w, h) the image content gets inside the network input (before any padding)."""
    if not keep_ratio:
        return net_w, net_h
    scale = min(net_w / orig_w, net_h / orig_h)
    return max(1, min(net_w, round(orig_w * scale))), max(1, min(net_h, round(orig_h * scale)))


def letterbox_or_resize(
    image_rgb: np.ndarray, img_size: Sequence[int], keep_ratio: bool
) -> tuple[np.ndarray, Letterbox]:
    """uint8 (H, W, 3) -> (uint8 (h, w, 3) network input, Letterbox meta). img_size is (h, w)."""
    _check_image(image_rgb)
    net_h, net_w = int(img_size[0]), int(img_size[1])
    orig_h, orig_w = image_rgb.shape[:2]
    new_w, new_h = fit_size(orig_w, orig_h, net_w, net_h, keep_ratio)
    resized = image_rgb
    if (new_w, new_h) != (orig_w, orig_h):
        resized = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = (net_w - new_w) // 2, (net_h - new_h) // 2
    if (new_w, new_h) != (net_w, net_h):
        resized = cv2.copyMakeBorder(
            resized,
            pad_y,
            net_h - new_h - pad_y,
            pad_x,
            net_w - new_w - pad_x,
            cv2.BORDER_CONSTANT,
            value=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
        )
    # The real scale of the content (rounding of new_w/new_h included), so boxes map back exactly.
    meta = Letterbox(new_w / orig_w, new_h / orig_h, float(pad_x), float(pad_y), orig_w, orig_h, net_w, net_h)
    return np.ascontiguousarray(resized), meta


def to_model_input(images: Sequence[np.ndarray]) -> np.ndarray:
    """List of uint8 (h, w, 3) RGB network-size images -> float32 (B, 3, h, w) in [0, 1] (no mean/std)."""
    if len(images) == 0:
        raise ValueError("to_model_input needs at least one image")
    batch = np.stack(images).astype(np.float32) / 255.0  # (B, h, w, 3)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def image_to_tensor(image: np.ndarray):
    """One uint8 (h, w, 3) RGB image -> torch float32 (3, h, w) in [0, 1] (what the dataset returns)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


def _clip(boxes, max_x: float, max_y: float):
    if isinstance(boxes, np.ndarray):
        boxes[..., 0::2] = np.clip(boxes[..., 0::2], 0.0, max_x)
        boxes[..., 1::2] = np.clip(boxes[..., 1::2], 0.0, max_y)
    else:  # torch.Tensor
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0.0, max_x)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0.0, max_y)
    return boxes


def _copy_float(boxes):
    """A float copy (float64 stays float64, everything else becomes float32); lists become numpy."""
    if not hasattr(boxes, "clone"):
        boxes = np.asarray(boxes)
    if isinstance(boxes, np.ndarray):
        return boxes.astype(np.float64 if boxes.dtype == np.float64 else np.float32, copy=True)
    import torch

    return boxes.clone() if boxes.dtype == torch.float64 else boxes.float().clone()


def boxes_to_original(boxes_xyxy, meta: Letterbox):
    """xyxy boxes in network-input pixels (..., 4) -> xyxy in original image pixels, clipped to the image.

    Works on numpy arrays and torch tensors (returns the same kind; the input is not modified).
    """
    boxes = _copy_float(boxes_xyxy)
    boxes[..., 0::2] = (boxes[..., 0::2] - meta.pad_x) / meta.scale_x
    boxes[..., 1::2] = (boxes[..., 1::2] - meta.pad_y) / meta.scale_y
    return _clip(boxes, float(meta.orig_w), float(meta.orig_h))


MASK_CHUNK = 16  # masks resampled at once: bounds the float memory to 16 original-size maps
# A pixel belongs to a mask above this logit (probability 0.27), not 0: the mask loss leaves a trained
# model's logits on an object's own outermost pixels below 0, so at 0 every mask is drawn inside its object
# (benchmarks/mask_quality.py measures the edge logits and the threshold sweep).
MASK_LOGIT_THRESHOLD = -1.0


def resample_logits(mask_logits, meta: Letterbox):
    """Mask logits (K, h, w) over the whole network input (any stride: h = net_h / s) -> float32 logits
    (K, orig_h, orig_w) at the original image's pixels.

    Every original pixel centre is mapped into the network input (net = orig * scale + pad, the inverse of
    boxes_to_original) and the logits are read there bilinearly, so padding and scale are undone in one
    resampling. Takes numpy or torch, returns torch (on the logits' device).
    """
    import torch
    import torch.nn.functional as F

    logits = torch.as_tensor(mask_logits)
    if logits.ndim != 3:
        raise ValueError(f"mask logits must be (K, h, w), got shape {tuple(logits.shape)}")
    logits = logits.float()
    device = logits.device
    xs = (torch.arange(meta.orig_w, device=device) + 0.5) * meta.scale_x + meta.pad_x  # network pixels
    ys = (torch.arange(meta.orig_h, device=device) + 0.5) * meta.scale_y + meta.pad_y
    grid_x = (2 * xs / meta.net_w - 1).view(1, -1).expand(meta.orig_h, -1)  # grid_sample's [-1, 1]
    grid_y = (2 * ys / meta.net_h - 1).view(-1, 1).expand(-1, meta.orig_w)
    grid = torch.stack([grid_x, grid_y], dim=-1).unsqueeze(0)  # (1, orig_h, orig_w, 2)
    chunk = logits.unsqueeze(1)  # (K, 1, h, w)
    sampled = F.grid_sample(
        chunk, grid.expand(len(chunk), -1, -1, -1), padding_mode="border", align_corners=False
    )
    return sampled[:, 0]


def box_interiors(boxes_xyxy, height: int, width: int, device=None):
    """xyxy boxes (K, 4) in original pixels -> bool (K, height, width): the pixels whose centre (i + 0.5)
    lies inside each box."""
    import torch

    boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float32, device=device).reshape(-1, 4)
    centres_x = torch.arange(width, device=boxes.device) + 0.5
    centres_y = torch.arange(height, device=boxes.device) + 0.5
    inside_x = (centres_x >= boxes[:, :1]) & (centres_x <= boxes[:, 2:3])  # (K, width)
    inside_y = (centres_y >= boxes[:, 1:2]) & (centres_y <= boxes[:, 3:4])  # (K, height)
    return inside_y[:, :, None] & inside_x[:, None, :]


def masks_to_original(mask_logits, meta: Letterbox, threshold: float = MASK_LOGIT_THRESHOLD, boxes_xyxy=None):
    """Mask logits (K, h, w) over the whole network input -> bool masks (K, orig_h, orig_w) of the
    original image: resample_logits(...) > threshold (MASK_LOGIT_THRESHOLD; 0 = probability 0.5).

    boxes_xyxy (K, 4) in original pixels (boxes_to_original's): pixels outside each mask's own box are
    cleared (a query's stray blobs elsewhere in the image are not its object). Takes numpy or torch,
    returns torch (on the logits' device).
    """
    import torch

    logits = torch.as_tensor(mask_logits)
    if logits.ndim != 3:
        raise ValueError(f"mask logits must be (K, h, w), got shape {tuple(logits.shape)}")
    masks = torch.zeros((len(logits), meta.orig_h, meta.orig_w), dtype=torch.bool, device=logits.device)
    for start in range(0, len(logits), MASK_CHUNK):
        chunk = logits[start : start + MASK_CHUNK]
        masks[start : start + len(chunk)] = resample_logits(chunk, meta) > threshold
    if boxes_xyxy is not None:
        masks &= box_interiors(boxes_xyxy, meta.orig_h, meta.orig_w, logits.device)
    return masks


def masks_in_boxes(mask_logits, meta: Letterbox, boxes_xyxy, hwk: bool = False) -> np.ndarray:
    """masks_to_original(mask_logits, meta, boxes_xyxy=boxes_xyxy) pixel for pixel, resampling only the
    pixels inside each box (outside it the mask is cleared anyway): the cost follows the boxes' area, not K
    whole images (10 masks of an 800x600 image took 216 ms on 2 CPU cores as whole images).

    mask_logits (K, h, w) numpy/torch, boxes_xyxy (K, 4) original pixels -> (K, orig_h, orig_w) bool, or with
    hwk=True (orig_h, orig_w, K) uint8 in Fortran order, the layout COCO RLE encoding reads without a copy.
    """
    import torch

    logits = torch.as_tensor(mask_logits)
    count, height, width = len(logits), meta.orig_h, meta.orig_w
    if hwk:
        out = np.zeros((height, width, count), np.uint8, order="F")
    else:
        out = np.zeros((count, height, width), bool)
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)):
        # the pixels whose centre (i + 0.5) lies in the box, as masks_to_original's box test keeps them
        col0, row0 = max(0, math.ceil(x0 - 0.5)), max(0, math.ceil(y0 - 0.5))
        col1, row1 = min(width, math.floor(x1 - 0.5) + 1), min(height, math.floor(y1 - 0.5) + 1)
        if col1 <= col0 or row1 <= row0:
            continue
        window = replace(  # the same network geometry seen from the window's top-left pixel
            meta,
            pad_x=meta.pad_x + col0 * meta.scale_x,
            pad_y=meta.pad_y + row0 * meta.scale_y,
            orig_w=col1 - col0,
            orig_h=row1 - row0,
        )
        mask = masks_to_original(logits[k : k + 1], window)[0].cpu().numpy()
        if hwk:
            out[row0:row1, col0:col1, k] = mask
        else:
            out[k, row0:row1, col0:col1] = mask
    return out


def boxes_xyxy_to_network(boxes_xyxy, meta: Letterbox):
    """xyxy boxes in original pixels -> xyxy in network-input pixels (numpy or torch, copied)."""
    boxes = _copy_float(boxes_xyxy)
    boxes[..., 0::2] = boxes[..., 0::2] * meta.scale_x + meta.pad_x
    boxes[..., 1::2] = boxes[..., 1::2] * meta.scale_y + meta.pad_y
    return boxes


def boxes_to_network(boxes_cxcywh_norm: np.ndarray, meta: Letterbox) -> np.ndarray:
    """Labels: normalised cxcywh in the original image (N, 4) -> normalised cxcywh in the network input."""
    boxes = np.asarray(boxes_cxcywh_norm, dtype=np.float32).reshape(-1, 4)
    out = np.empty_like(boxes)
    out[:, 0] = (boxes[:, 0] * meta.orig_w * meta.scale_x + meta.pad_x) / meta.net_w
    out[:, 1] = (boxes[:, 1] * meta.orig_h * meta.scale_y + meta.pad_y) / meta.net_h
    out[:, 2] = boxes[:, 2] * meta.orig_w * meta.scale_x / meta.net_w
    out[:, 3] = boxes[:, 3] * meta.orig_h * meta.scale_y / meta.net_h
    return out


def network_boxes_to_original_xyxy(boxes_cxcywh_norm, meta: Letterbox) -> np.ndarray:
    """Normalised cxcywh in the network input (what the dataset returns) -> float32 xyxy original pixels."""
    import torch

    from src.common.boxes import cxcywh_to_xyxy

    boxes = torch.as_tensor(np.asarray(boxes_cxcywh_norm, dtype=np.float64)).reshape(-1, 4)
    xyxy = cxcywh_to_xyxy(boxes) * torch.tensor([meta.net_w, meta.net_h] * 2, dtype=torch.float64)
    return boxes_to_original(xyxy, meta).numpy().astype(np.float32)


def preprocess_images(
    images_rgb: Sequence[np.ndarray], img_size: Sequence[int], keep_ratio: bool
) -> tuple[np.ndarray, list[Letterbox]]:
    """The whole inference-side preprocessing: RGB uint8 images -> ((B, 3, h, w) float32, metas)."""
    resized, metas = zip(*(letterbox_or_resize(img, img_size, keep_ratio) for img in images_rgb), strict=True)
    return to_model_input(resized), list(metas)
