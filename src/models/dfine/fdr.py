"""Fine-grained Distribution Refinement (FDR) math shared by the D-FINE decoder and its criterion.

D-FINE predicts each box edge as a distribution over `reg_max + 1` bins. The bins are not evenly spaced:
the weighting function W(n) puts many small offsets near the centre (fine corrections) and a few large
ones at both ends, bounded by `up * reg_scale`. An edge offset is the expectation sum_n P(n) W(n), in
units of the reference box size divided by `reg_scale`.

Every function here is plain torch and the single home of this math in the project (the decoder, the
criterion and the denoising code import it from here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.common.boxes import xyxy_to_cxcywh


def weighting_function(reg_max: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """The bin values W(0..reg_max), shape (reg_max + 1,), in the dtype/device of `up`.

    up, reg_scale: 1-element tensors. W is symmetric around W(reg_max / 2) = 0, grows geometrically
    (W(k) = step^k - 1 to the right) up to +-up*reg_scale, and the two outermost bins sit at
    +-2*up*reg_scale to catch large offsets.
    """
    inner_bound = up.abs()[0] * reg_scale.abs()  # (1,)
    outer_bound = inner_bound * 2
    step = (inner_bound + 1) ** (2 / (reg_max - 2))
    # Integer powers one at a time, as the reference does (a tensor-valued exponent rounds differently).
    right = [step**k - 1 for k in range(1, reg_max // 2)]
    left = [-(step**k) + 1 for k in range(reg_max // 2 - 1, 0, -1)]
    centre = torch.zeros_like(up[:1])
    return torch.cat([-outer_bound, *left, centre, *right, outer_bound], dim=0)


def distribution_to_distance(corner_logits: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """Expected edge offsets: (..., 4 * (reg_max + 1)) logits -> (..., 4) sum_n softmax(logits)_n W(n)."""
    bins = project.shape[0]
    probs = F.softmax(corner_logits.reshape(-1, bins), dim=1)
    return F.linear(probs, project).reshape(*corner_logits.shape[:-1], 4)


def distance2bbox(
    points: torch.Tensor, distance: torch.Tensor, reg_scale: torch.Tensor | float
) -> torch.Tensor:
    """Boxes from a reference box and edge offsets.

    points (..., 4) reference boxes cxcywh; distance (..., 4) offsets of the left, top, right, bottom
    edges in units of (reference size / reg_scale), measured from the reference's half-size.
    Returns (..., 4) cxcywh.
    """
    reg_scale = abs(reg_scale)
    cx, cy, w, h = points.unbind(-1)
    half = 0.5 * reg_scale
    x1 = cx - (half + distance[..., 0]) * (w / reg_scale)
    y1 = cy - (half + distance[..., 1]) * (h / reg_scale)
    x2 = cx + (half + distance[..., 2]) * (w / reg_scale)
    y2 = cy + (half + distance[..., 3]) * (h / reg_scale)
    return xyxy_to_cxcywh(torch.stack([x1, y1, x2, y2], dim=-1))


def bbox2distance(
    points: torch.Tensor,
    bbox: torch.Tensor,
    reg_max: int,
    reg_scale: torch.Tensor | float,
    up: torch.Tensor,
    eps: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of distance2bbox, as soft bin targets for the FGL loss.

    points (n, 4) reference boxes cxcywh; bbox (n, 4) target boxes xyxy. Returns (detached):
    target bin position (n * 4,) in [0, reg_max - eps], and the interpolation weights of the right and
    left neighbouring bins (n * 4,) each.
    """
    reg_scale = abs(reg_scale)
    unit_w = points[:, 2] / reg_scale + 1e-16
    unit_h = points[:, 3] / reg_scale + 1e-16
    left = (points[:, 0] - bbox[:, 0]) / unit_w - 0.5 * reg_scale
    top = (points[:, 1] - bbox[:, 1]) / unit_h - 0.5 * reg_scale
    right = (bbox[:, 2] - points[:, 0]) / unit_w - 0.5 * reg_scale
    bottom = (bbox[:, 3] - points[:, 1]) / unit_h - 0.5 * reg_scale
    distances = torch.stack([left, top, right, bottom], dim=-1)
    position, weight_right, weight_left = translate_gt(distances, reg_max, reg_scale, up)
    position = position.clamp(min=0, max=reg_max - eps)
    return position.reshape(-1).detach(), weight_right.detach(), weight_left.detach()


def translate_gt(
    gt: torch.Tensor, reg_max: int, reg_scale: torch.Tensor | float, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place continuous offsets between the two nearest bins of W.

    gt (any shape) -> index of the left bin as float (n,), weight of the right bin (n,), weight of the
    left bin (n,). Offsets below W(0) go fully to bin 0; offsets beyond W(reg_max) fully to the last bin
    (index reg_max - 0.1 so that floor/ceil stay in range).
    """
    gt = gt.reshape(-1)
    if not torch.is_tensor(reg_scale):
        reg_scale = torch.tensor([reg_scale], dtype=up.dtype, device=up.device)
    values = weighting_function(reg_max, up, reg_scale)
    left_index = ((values.unsqueeze(0) - gt.unsqueeze(1)) <= 0).sum(dim=1) - 1
    # float32 whatever the model dtype: the reference does the same, and the FGL loss parity depends on it.
    index = left_index.float()

    weight_right = torch.zeros_like(index)
    weight_left = torch.zeros_like(index)

    inside = (index >= 0) & (index < reg_max)
    inside_index = index[inside].long()
    left_gap = (gt[inside] - values[inside_index]).abs()
    right_gap = (values[inside_index + 1] - gt[inside]).abs()
    weight_right[inside] = (left_gap / (left_gap + right_gap)).to(weight_right.dtype)
    weight_left[inside] = 1.0 - weight_right[inside]

    below = index < 0
    weight_right[below] = 0.0
    weight_left[below] = 1.0
    index[below] = 0.0

    beyond = index >= reg_max
    weight_right[beyond] = 1.0
    weight_left[beyond] = 0.0
    index[beyond] = reg_max - 0.1
    return index, weight_right, weight_left
