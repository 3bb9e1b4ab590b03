"""The matcher's assignment: every image's cost block from one batched cost call, scipy only where an image
has more than one object; the pairs are those of scipy on each image's own cost matrix."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from src.models.matcher import HungarianMatcher


def test_batched_assignment_equals_scipy_on_each_image_alone():
    generator = torch.Generator().manual_seed(0)
    batch, queries, classes = 6, 30, 5
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes, generator=generator),
        "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.1,
    }
    counts = [0, 1, 3, 1, 7, 2]  # no object, one object (no scipy), several
    targets = [
        {
            "labels": torch.randint(0, classes, (n,), generator=generator),
            "boxes": torch.rand(n, 4, generator=generator) * 0.5 + 0.1,
        }
        for n in counts
    ]
    matcher = HungarianMatcher()
    matches = matcher(outputs, targets)
    for image, ((rows, cols), target) in enumerate(zip(matches, targets, strict=True)):
        alone = matcher.cost_matrix(
            outputs["pred_logits"][image], outputs["pred_boxes"][image], target["labels"], target["boxes"]
        )
        expected_rows, expected_cols = linear_sum_assignment(alone.numpy())
        assert rows.tolist() == expected_rows.tolist() and cols.tolist() == expected_cols.tolist()
        assert rows.dtype == cols.dtype == torch.int64 and len(rows) == counts[image]
    nothing = matcher(
        outputs, [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 6
    )
    assert all(len(rows) == len(cols) == 0 for rows, cols in nothing)
