"""D-FINE training side: contrastive denoising groups, Hungarian matcher, criterion.

The parity tests follow tests/fixtures/parity (README of the shared spec): our model with the
deterministic weights in float64, train mode without denoising, and every loss term of our criterion
against the official criterion's value (D-FINE: VFL; DEIM: MAL).
"""

from __future__ import annotations

import json

import pytest
import torch

from src.models import build_criterion, build_model
from src.models.criterion import union_of_matches
from src.models.denoising import get_contrastive_denoising_training_group
from src.models.matcher import HungarianMatcher
from tests.parity_data import (
    FIXTURES,
    assert_losses_match,
    parity_input,
    parity_targets,
    prepare_parity_model,
)


def _parity_train_outputs(size: str, variant: str) -> dict:
    """The parity procedure up to the train-mode forward (denoising off)."""
    prefix, folder = ("dfine", FIXTURES) if variant == "dfine" else ("deim", FIXTURES / "deim")
    model = build_model(size, 80, img_size=(640, 640), variant=variant, num_denoising=0)
    prepare_parity_model(model, folder / f"{prefix}_{size}_bn_stats.npz").train()
    with torch.no_grad():
        return model(parity_input(), parity_targets())


SLOW = pytest.mark.slow
PARITY_CASES = [
    pytest.param("dfine", "n", id="dfine-n"),
    pytest.param("dfine", "s", id="dfine-s"),
    pytest.param("dfine", "m", id="dfine-m", marks=SLOW),
    pytest.param("dfine", "l", id="dfine-l", marks=SLOW),
    pytest.param("dfine", "x", id="dfine-x", marks=SLOW),
    pytest.param("deim", "n", id="deim-n"),
    pytest.param("deim", "s", id="deim-s", marks=SLOW),
    pytest.param("deim", "m", id="deim-m", marks=SLOW),
    pytest.param("deim", "l", id="deim-l", marks=SLOW),
    pytest.param("deim", "x", id="deim-x", marks=SLOW),
]


@pytest.mark.parametrize(("variant", "size"), PARITY_CASES)
def test_loss_parity_with_official_criterion(variant, size):
    outputs = _parity_train_outputs(size, variant)
    cls_loss = "vfl" if variant == "dfine" else "mal"
    losses = build_criterion(size, 80, cls_loss=cls_loss)(outputs, parity_targets())
    folder = FIXTURES if variant == "dfine" else FIXTURES / "deim"
    expected = json.loads((folder / f"{variant}_{size}_losses.json").read_text())
    assert_losses_match({k: v.item() for k, v in losses.items()}, expected)


# --- denoising ---------------------------------------------------------------------------------------


def _targets(boxes_per_image: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, 5, (n,), generator=generator),
            # centred boxes of size 0.2: even the largest jitter (2 half-sizes) stays inside the image
            "boxes": torch.cat(
                [0.4 + 0.2 * torch.rand(n, 2, generator=generator), torch.full((n, 2), 0.2)], 1
            ),
        }
        for n in boxes_per_image
    ]


def test_denoising_groups_shapes_mask_and_positive_indices():
    num_classes, num_queries, hidden = 5, 7, 16
    embed = torch.nn.Embedding(num_classes + 1, hidden, padding_idx=num_classes)
    targets = _targets([3, 1])
    torch.manual_seed(0)
    queries, boxes, mask, meta = get_contrastive_denoising_training_group(
        targets, num_classes, num_queries, embed, num_denoising=12
    )
    # max 3 boxes per image -> 12 // 3 = 4 groups of (3 positive + 3 negative) queries
    assert meta["dn_num_group"] == 4 and meta["dn_num_split"] == [24, num_queries]
    assert queries.shape == (2, 24, hidden) and boxes.shape == (2, 24, 4)
    assert mask.shape == (31, 31) and mask.dtype == torch.bool

    assert mask[24:, :24].all(), "matching queries must not see any denoising query"
    assert not mask[24:, 24:].any() and not mask[:24, 24:].any()
    group = torch.arange(24) // 6
    assert torch.equal(mask[:24, :24], group[:, None] != group[None, :]), "each group sees only itself"

    # the positives of every group, padded slots excluded (image 1 has one box)
    assert meta["dn_positive_idx"][0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20]
    assert meta["dn_positive_idx"][1].tolist() == [0, 6, 12, 18]


def test_denoising_positive_boxes_stay_close_negatives_move_away():
    targets = _targets([4, 4], seed=1)
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    torch.manual_seed(1)
    _, boxes_logit, _, meta = get_contrastive_denoising_training_group(
        targets, 5, 10, embed, num_denoising=100, label_noise_ratio=0.0
    )
    noisy = boxes_logit.sigmoid()  # (2, 200, 4) cxcywh
    original = torch.stack([t["boxes"] for t in targets]).tile(1, 2 * meta["dn_num_group"], 1)
    is_positive = ((torch.arange(noisy.shape[1]) // 4) % 2 == 0)[None, :, None]  # [4 pos | 4 neg] per group

    def corners(b):
        return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

    shift = (corners(noisy) - corners(original)).abs()  # (2, 200, 4)
    half_size = torch.cat([original[..., 2:], original[..., 2:]], -1) / 2
    positive_shift = shift.masked_select(is_positive.expand_as(shift))
    assert (positive_shift <= half_size.masked_select(is_positive.expand_as(shift)) + 1e-5).all()
    negative_shift = shift.masked_select(~is_positive.expand_as(shift))
    assert negative_shift.mean() > 2 * positive_shift.mean()


def test_denoising_labels_padding_and_degenerate_batches():
    embed = torch.nn.Embedding(6, 8, padding_idx=5)
    targets = _targets([2, 0])
    queries, _, _, meta = get_contrastive_denoising_training_group(
        targets, 5, 10, embed, num_denoising=4, label_noise_ratio=0.0
    )
    assert meta["dn_num_group"] == 2
    labels = targets[0]["labels"]
    expected_image0 = embed(
        torch.cat([labels, labels] * 2)
    )  # no label noise: positives and negatives keep labels
    assert torch.equal(queries[0], expected_image0)
    assert torch.equal(queries[1], torch.zeros_like(queries[1])), "padding slots use the zero padding row"
    assert meta["dn_positive_idx"][1].numel() == 0

    assert get_contrastive_denoising_training_group(targets, 5, 10, embed, num_denoising=0) == (None,) * 4
    none_q, none_b, none_m, empty_meta = get_contrastive_denoising_training_group(
        _targets([0, 0]), 5, 10, embed
    )
    assert none_q is None and none_b is None and none_m is None
    assert empty_meta["dn_num_group"] == 0 and empty_meta["dn_num_split"] == [0, 10]


# --- matcher -----------------------------------------------------------------------------------------


def test_matcher_on_a_hand_made_case():
    big = 6.0  # logit: sigmoid ~ 1
    logits = torch.full((2, 3, 4), -big)
    boxes = torch.tensor(
        [
            [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.3, 0.3]],
            [[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]],
        ]
    )
    logits[0, 2, 1] = big  # query 2 looks like target 0 (class 1, box of query 2)
    logits[0, 0, 3] = big  # query 0 looks like target 1 (class 3, box of query 0)
    targets = [
        {
            "labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.8, 0.8, 0.3, 0.3], [0.21, 0.2, 0.1, 0.1]]),
        },
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    (queries, gts), (empty_q, empty_t) = HungarianMatcher()(
        {"pred_logits": logits, "pred_boxes": boxes}, targets
    )
    assert sorted(zip(queries.tolist(), gts.tolist())) == [(0, 1), (2, 0)]
    assert empty_q.numel() == 0 and empty_t.numel() == 0

    # the class cost alone decides when boxes are all equal
    same_boxes = torch.full((1, 3, 4), 0.5)
    class_logits = torch.full((1, 3, 4), -big)
    class_logits[0, 1, 2] = big
    target = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    ((query, _),) = HungarianMatcher()({"pred_logits": class_logits, "pred_boxes": same_boxes}, target)
    assert query.tolist() == [1]


def _square_mask(size: int, x0: int, x1: int) -> torch.Tensor:
    """(size, size) bool mask: the columns x0..x1 of rows 0..size/2 (a left or right block)."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[: size // 2, x0:x1] = True
    return mask


def _tied_boxes_case() -> tuple[dict, list[dict]]:
    """Two queries with identical class scores and boxes, two objects with identical labels and boxes:
    the box cost ties everywhere. Query 0's mask logits are object 1's mask, query 1's are object 0's."""
    left, right = _square_mask(32, 0, 16), _square_mask(32, 16, 32)
    logits = torch.zeros(1, 2, 3)
    boxes = torch.full((1, 2, 4), 0.5)
    pred_masks = torch.stack([right, left]).float().mul(16).sub(8).unsqueeze(0)  # (1, 2, 32, 32): +-8 logits
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": pred_masks}
    masks = torch.nn.functional.interpolate(torch.stack([left, right])[None].float(), size=64)[0] > 0.5
    target = {"labels": torch.tensor([1, 1]), "boxes": torch.full((2, 4), 0.5), "masks": masks}
    return outputs, [target]


def test_matcher_mask_cost_decides_where_boxes_tie():
    outputs, targets = _tied_boxes_case()
    ((box_q, box_t),) = HungarianMatcher()(outputs, targets)
    assert sorted(zip(box_q.tolist(), box_t.tolist())) == [(0, 0), (1, 1)]  # the solver's tie order
    torch.manual_seed(0)
    ((queries, gts),) = HungarianMatcher(cost_mask=1.0)(outputs, targets)
    assert sorted(zip(queries.tolist(), gts.tolist())) == [(0, 1), (1, 0)]
    # objects without a mask are matched on boxes and class alone: the tie order comes back
    no_masks = [{**targets[0], "has_mask": torch.tensor([False, False])}]
    ((queries, gts),) = HungarianMatcher(cost_mask=1.0)(outputs, no_masks)
    assert sorted(zip(queries.tolist(), gts.tolist())) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="cost_mask"):
        HungarianMatcher(cost_mask=-1.0)


def test_mask_cost_values_and_box_only_columns():
    from src.models.matcher import mask_cost

    outputs, targets = _tied_boxes_case()
    torch.manual_seed(0)
    cost = mask_cost(outputs["pred_masks"][0], targets[0])  # (Q=2, n=2)
    assert cost.shape == (2, 2)
    # the right mask against the right object: near-zero BCE and dice; against the other object: large
    assert cost[0, 1] < 0.05 and cost[1, 0] < 0.05 and cost[0, 0] > 1 and cost[1, 1] > 1
    flagged = {**targets[0], "has_mask": torch.tensor([True, False])}
    cost = mask_cost(outputs["pred_masks"][0], flagged)
    assert torch.all(cost[:, 1] == 0) and torch.all(cost[:, 0] > 0)


def test_matcher_mask_cost_zero_or_no_masks_is_todays_matching():
    """Weight 0 (the default) matches exactly like the box-only matcher, and so do outputs without
    "pred_masks" (earlier decoder layers, encoder proposals) whatever the weight."""
    torch.manual_seed(3)
    outputs = {
        "pred_logits": torch.randn(2, 20, 3),
        "pred_boxes": torch.rand(2, 20, 4) * 0.5 + 0.25,
        "pred_masks": torch.randn(2, 20, 16, 16),
    }
    targets = [
        {
            "labels": torch.randint(0, 3, (n,)),
            "boxes": torch.rand(n, 4) * 0.5 + 0.25,
            "masks": torch.rand(n, 64, 64) > 0.5,
        }
        for n in (5, 7)
    ]
    box_only = {k: v for k, v in outputs.items() if k != "pred_masks"}
    reference = HungarianMatcher()(box_only, targets)
    for matcher, out in (
        (HungarianMatcher(cost_mask=0.0), outputs),
        (HungarianMatcher(cost_mask=5.0), box_only),
    ):
        for (q, t), (ref_q, ref_t) in zip(matcher(out, targets), reference):
            assert torch.equal(q, ref_q) and torch.equal(t, ref_t)


def test_segmentation_criterion_with_matcher_cost_trains():
    """train.mask_loss.matcher_cost reaches the matcher; a real segment model's loss stays finite with it."""
    from src.common.config import load_config

    settings = dict(load_config(["train.mask_loss.matcher_cost=5"]).train.mask_loss)
    criterion = build_criterion("n", 3, mask_loss=settings)
    assert criterion.matcher.cost_mask == 5.0 and build_criterion("n", 3).matcher.cost_mask == 0.0
    torch.manual_seed(0)
    model = build_model("n", 3, img_size=(128, 128), num_queries=20, task="segment")
    model.train()
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[32:96, 40:80] = True
    targets = [
        {
            "labels": torch.tensor([1]),
            "boxes": torch.tensor([[0.47, 0.5, 0.31, 0.5]]),
            "masks": mask[None],
            "has_mask": torch.tensor([True]),
        }
    ]
    losses = criterion(model(torch.rand(1, 3, 128, 128), targets), targets)
    assert losses["loss_mask_dice"] > 0 and all(torch.isfinite(v) for v in losses.values())
    assert _backward_is_finite(model, losses)


def test_union_of_matches_takes_each_querys_most_frequent_target():
    def match(pairs):
        return [(torch.tensor([q for q, _ in pairs]), torch.tensor([t for _, t in pairs]))]

    heads = [match([(5, 0), (7, 1)]), match([(5, 1), (7, 1)]), match([(5, 1), (9, 0)])]
    ((queries, targets),) = union_of_matches(heads)
    assert dict(zip(queries.tolist(), targets.tolist())) == {5: 1, 7: 1, 9: 0}


# --- criterion on the real model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("n", 3, img_size=(128, 128), num_queries=50, num_denoising=20).train()


def _backward_is_finite(model, losses) -> bool:
    model.zero_grad()
    sum(losses.values()).backward()
    return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("cls_loss", ["vfl", "mal"])
def test_criterion_with_a_background_only_image(tiny_model, cls_loss):
    images = torch.rand(2, 3, 128, 128)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    criterion = build_criterion("n", 3, cls_loss=cls_loss)
    losses = criterion(tiny_model(images, targets), targets)
    names = {k.split("_")[1] for k in losses}
    assert names == {cls_loss, "bbox", "giou", "fgl", "ddf"}
    assert any(k.endswith("_dn_0") for k in losses) and "loss_ddf_aux_0" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    assert _backward_is_finite(tiny_model, losses)


def test_criterion_with_no_box_in_the_whole_batch(tiny_model):
    images = torch.rand(2, 3, 128, 128)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = build_criterion("n", 3)(tiny_model(images, targets), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # nothing matched: only the background part of the classification loss is non-zero
    assert all(v.item() == 0 for k, v in losses.items() if "bbox" in k or "giou" in k or "fgl" in k)
    assert losses["loss_vfl"].item() > 0
    assert _backward_is_finite(tiny_model, losses)


def test_criterion_rejects_labels_outside_the_model_classes(tiny_model):
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    tiny_model.decoder.num_denoising = 0  # the check under test is the criterion's, not the embedding's
    try:
        outputs = tiny_model(torch.rand(1, 3, 128, 128), targets)
    finally:
        tiny_model.decoder.num_denoising = 20
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        build_criterion("n", 3)(outputs, targets)
    with pytest.raises(ValueError, match="cls_loss"):
        build_criterion("n", 3, cls_loss="focal")
