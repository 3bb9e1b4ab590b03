"""Compile-ready denoising (no data-dependent shapes) and train.compile's eager fallback."""

from __future__ import annotations

import torch
import torch._dynamo
from loguru import logger
from torch import nn

from src.common.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from src.dl.train.speed import maybe_compile
from src.models.denoising import (
    _jitter_boxes,
    get_contrastive_denoising_training_group,
    positive_query_indices,
)


def _targets(counts: list[int], seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, 4, (n,), generator=generator),
            "boxes": torch.cat(
                [
                    0.3 + 0.4 * torch.rand(n, 2, generator=generator),
                    0.1 + 0.2 * torch.rand(n, 2, generator=generator),
                ],
                1,
            ),
        }
        for n in counts
    ]


def test_positive_indices_equal_those_of_the_positive_mask():
    for counts in ([3, 1, 0], [5], [0, 2], [7, 7, 1]):
        max_gt = max(counts)
        num_group = max(100 // max_gt, 1)
        # The mask the indices were read from before: per group [max_gt positives | max_gt negatives].
        is_real = torch.arange(max_gt)[None, :] < torch.tensor(counts)[:, None]  # (B, max_gt)
        positive = torch.cat([is_real, torch.zeros_like(is_real)], 1).tile([1, num_group])
        expected = torch.split(torch.nonzero(positive)[:, 1], [n * num_group for n in counts])
        got = positive_query_indices(counts, max_gt, num_group)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, expected, strict=True))


def test_denoising_groups_trace_without_graph_breaks():
    embedding = nn.Embedding(5, 8)
    targets = _targets([3, 1, 0])

    def groups(targets, num_negatives):
        return get_contrastive_denoising_training_group(
            targets, 4, 10, embedding, 100, 0.5, 1.0, num_negatives
        )

    for num_negatives in (0, 6):
        explanation = torch._dynamo.explain(groups)(targets, num_negatives)
        assert explanation.graph_break_count == 0, explanation.break_reasons


def test_jitter_gives_the_values_of_the_masked_flip():
    """abs() replaced `jittered[jittered < 0] *= -1` (a data-dependent shape): same draws, same boxes."""
    boxes = torch.rand(2, 40, 4) * 0.6 + 0.05
    is_negative = (torch.arange(40) % 2).float()[None, :, None].expand(2, 40, 1)
    torch.manual_seed(5)
    new = _jitter_boxes(boxes, is_negative, 1.0)
    torch.manual_seed(5)
    corners = cxcywh_to_xyxy(boxes)
    half_size = torch.tile(boxes[..., 2:] * 0.5, [1, 1, 2])
    sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
    fraction = torch.rand_like(boxes)
    fraction = (fraction + 1.0) * is_negative + fraction * (1 - is_negative)
    old = xyxy_to_cxcywh(torch.clip(corners + sign * fraction * half_size, min=0.0, max=1.0))
    assert (old < 0).any()  # the flip matters here
    old[old < 0] *= -1
    assert torch.equal(new, old)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(model, **kwargs):
        def run(*args, **kwargs):
            raise RuntimeError("backend exploded\nlong trace")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        model = nn.Linear(3, 2)
        wrapped = maybe_compile(model, enabled=True)
        x = torch.ones(1, 3)
        assert torch.equal(wrapped(x), model(x)) and torch.equal(wrapped(x), model(x))
    finally:
        logger.remove(sink)
    assert len(warnings) == 1 and "backend exploded" in warnings[0] and "training eagerly" in warnings[0]
    assert maybe_compile(model, enabled=False) is model
    assert list(wrapped.state_dict()) == ["eager.weight", "eager.bias"]  # no second copy of the weights
