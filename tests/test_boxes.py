"""Box IoU helpers (src/common/boxes.py)."""

from __future__ import annotations

import torch

from src.common.boxes import box_iou, generalized_box_iou, paired_box_iou, paired_generalized_box_iou


def test_paired_iou_and_giou_are_the_diagonal_of_the_pairwise_ones():
    torch.manual_seed(0)
    top_left = torch.rand(40, 2)
    a = torch.cat([top_left, top_left + torch.rand(40, 2)], 1)
    b = torch.cat([top_left + 0.1, top_left + torch.rand(40, 2) + 0.05], 1)
    iou, union = paired_box_iou(a, b)
    full_iou, full_union = box_iou(a, b)
    assert torch.equal(iou, torch.diag(full_iou)) and torch.equal(union, torch.diag(full_union))
    assert torch.equal(paired_generalized_box_iou(a, b), torch.diag(generalized_box_iou(a, b)))
    # the same gradients as through the diagonal of the matrix
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    paired_generalized_box_iou(a1, b).sum().backward()
    torch.diag(generalized_box_iou(a2, b)).sum().backward()
    assert torch.allclose(a1.grad, a2.grad, rtol=0, atol=1e-7)
