"""False-positive control in training: bg_loss_weight (criterion) and background negatives in the
denoising branch (denoising.py + decoder + criterion). Off, both must leave the official loss untouched
(the parity tests in test_d_fine_criterion.py check that bit for bit against the official values)."""

from __future__ import annotations

import pytest
import torch

from src.common.boxes import box_iou, cxcywh_to_xyxy
from src.models import build_criterion, build_model
from src.models.denoising import (
    get_contrastive_denoising_training_group,
    sample_background_boxes,
    set_denoising_negatives,
)

NUM_CLASSES, NUM_QUERIES, NUM_DENOISING, IMG = 3, 20, 10, 64


def _empty_target() -> dict[str, torch.Tensor]:
    return {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


def _mixed_targets() -> list[dict[str, torch.Tensor]]:
    """One image with two boxes, one background-only image."""
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])
    return [{"labels": torch.tensor([0, 2]), "boxes": boxes}, _empty_target()]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(
        "n", NUM_CLASSES, img_size=(IMG, IMG), num_queries=NUM_QUERIES, num_denoising=NUM_DENOISING
    ).train()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


def _forward(model, images, targets, negatives: int = 0, seed: int = 1, grad: bool = False) -> dict:
    set_denoising_negatives(model, negatives, 0.3)
    try:
        torch.manual_seed(seed)
        with torch.set_grad_enabled(grad):
            return model(images, targets)
    finally:
        set_denoising_negatives(model, 0)


# --- bg_loss_weight ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_loss", ["vfl", "mal"])
def test_bg_loss_weight_scales_only_the_background_part(model, images, cls_loss):
    targets = _mixed_targets()
    outputs = _forward(model, images, targets)
    losses = {w: build_criterion("n", NUM_CLASSES, cls_loss=cls_loss, bg_loss_weight=w)(outputs, targets)
              for w in (0.0, 1.0, 3.0)}  # fmt: skip
    default = build_criterion("n", NUM_CLASSES, cls_loss=cls_loss)(outputs, targets)
    assert all(torch.equal(default[k], losses[1.0][k]) for k in default), "1.0 must be the official loss"

    cls_terms = [k for k in default if k.startswith(f"loss_{cls_loss}")]
    assert len(cls_terms) > 5  # last layer, aux layers, pre, encoder, denoising
    for key in cls_terms:
        # loss = matched part + w * background part: linear in w
        matched, background = losses[0.0][key], losses[1.0][key] - losses[0.0][key]
        assert background > 0, key
        assert losses[3.0][key].item() == pytest.approx((matched + 3 * background).item(), rel=1e-5), key
    for key in set(default) - set(cls_terms):  # boxes and distributions do not change
        assert torch.equal(losses[3.0][key], default[key]), key


def test_bg_loss_weight_on_a_batch_without_boxes(model, images):
    targets = [_empty_target(), _empty_target()]
    outputs = _forward(model, images, targets)
    base = build_criterion("n", NUM_CLASSES)(outputs, targets)
    doubled = build_criterion("n", NUM_CLASSES, bg_loss_weight=2.0)(outputs, targets)
    for key in base:  # every query is background here
        assert doubled[key].item() == pytest.approx(2 * base[key].item(), rel=1e-6), key
    with pytest.raises(ValueError, match="bg_loss_weight"):
        build_criterion("n", NUM_CLASSES, bg_loss_weight=-1.0)


# --- denoising negatives: groups, boxes, mask --------------------------------------------------------


def test_negative_boxes_avoid_ground_truth():
    # a crowded image (16 boxes on a grid) and an empty one
    centres = torch.stack(
        torch.meshgrid(torch.arange(4) / 4 + 0.125, torch.arange(4) / 4 + 0.125, indexing="ij")
    )
    crowded = torch.cat([centres.reshape(2, -1).T, torch.full((16, 2), 0.2)], 1)
    labels = torch.zeros(16, dtype=torch.int64)
    targets = [{"labels": labels, "boxes": crowded}, _empty_target()]
    torch.manual_seed(3)
    boxes, valid = sample_background_boxes(targets, 200, iou_thresh=0.3)
    assert boxes.shape == (2, 200, 4) and valid.shape == (2, 200)
    corners = cxcywh_to_xyxy(boxes)
    assert (corners >= -1e-6).all() and (corners <= 1 + 1e-6).all(), "negatives lie inside the image"
    assert (boxes[..., 2:] >= 0.02 - 1e-6).all() and (boxes[..., 2:] <= 0.5 + 1e-6).all()
    iou = box_iou(corners[0], cxcywh_to_xyxy(crowded))[0].max(dim=1).values
    assert (iou[valid[0]] <= 0.3).all(), "a kept negative overlaps a ground-truth box"
    assert valid[0].sum() > 50 and valid[1].all(), "an empty image keeps every box"

    # an object filling the image: nothing is clear of it at IoU 0, every slot is invalid
    full = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]])}]
    _, none_valid = sample_background_boxes(full, 5, iou_thresh=0.0)
    assert not none_valid.any()


def test_negatives_block_mask_and_unchanged_groups():
    embed = torch.nn.Embedding(NUM_CLASSES + 1, 8, padding_idx=NUM_CLASSES)
    targets = _mixed_targets()
    torch.manual_seed(5)
    plain = get_contrastive_denoising_training_group(targets, NUM_CLASSES, 7, embed, num_denoising=8)
    torch.manual_seed(5)
    queries, boxes, mask, meta = get_contrastive_denoising_training_group(
        targets, NUM_CLASSES, 7, embed, num_denoising=8, num_negatives=5
    )
    # 2 boxes max -> 4 groups of 4 queries (16), then 5 negatives, then 7 matching queries
    grouped, negatives, total = 16, 5, 16 + 5 + 7
    assert meta["dn_num_split"] == [grouped + negatives, 7] and meta["dn_num_negatives"] == negatives
    assert queries.shape == (2, grouped + negatives, 8) and boxes.shape == (2, grouped + negatives, 4)
    assert mask.shape == (total, total)
    # the official groups are drawn first and stay exactly what they were
    assert torch.equal(queries[:, :grouped], plain[0]) and torch.equal(boxes[:, :grouped], plain[1])
    assert torch.equal(mask[:grouped, :grouped], plain[2][:grouped, :grouped])
    assert all(torch.equal(a, b) for a, b in zip(meta["dn_positive_idx"], plain[3]["dn_positive_idx"]))

    neg = slice(grouped, grouped + negatives)
    assert mask[grouped + negatives :, : grouped + negatives].all(), "matching queries see no denoising query"
    assert mask[:grouped, neg].all() and mask[neg, :grouped].all(), "groups and negatives are isolated"
    assert not mask[neg, neg].any(), "negatives see each other"
    assert not mask[:, grouped + negatives :].any(), "everyone sees the matching queries"
    assert meta["dn_negative_valid"].shape == (2, negatives) and meta["dn_negative_valid"].all()
    # negatives carry real-class content (never the padding row)
    assert (queries[:, neg].abs().sum(-1) > 0).all()


def test_negatives_on_a_batch_without_boxes():
    embed = torch.nn.Embedding(NUM_CLASSES + 1, 8, padding_idx=NUM_CLASSES)
    targets = [_empty_target(), _empty_target()]
    queries, boxes, mask, meta = get_contrastive_denoising_training_group(
        targets, NUM_CLASSES, 7, embed, num_denoising=8, num_negatives=4
    )
    assert meta["dn_num_group"] == 0 and meta["dn_num_split"] == [4, 7]
    assert all(p.numel() == 0 for p in meta["dn_positive_idx"])
    assert queries.shape == (2, 4, 8) and boxes.shape == (2, 4, 4) and mask.shape == (11, 11)
    assert mask[4:, :4].all() and not mask[:4, :4].any() and not mask[:, 4:].any()
    # off: unchanged official behaviour (no denoising at all for such a batch)
    assert (
        get_contrastive_denoising_training_group(targets, NUM_CLASSES, 7, embed, num_denoising=8)[0] is None
    )


# --- denoising negatives: model and criterion --------------------------------------------------------


@pytest.mark.parametrize("cls_loss", ["vfl", "mal"])
def test_negatives_only_add_a_classification_term(model, images, cls_loss):
    targets = _mixed_targets()
    criterion = build_criterion("n", NUM_CLASSES, cls_loss=cls_loss)
    plain = criterion(_forward(model, images, targets), targets)
    outputs = _forward(model, images, targets, negatives=6)
    with_negatives = criterion(outputs, targets)

    num_layers = len(outputs["dn_outputs"])
    assert len(outputs["dn_negative_outputs"]) == num_layers
    assert outputs["dn_negative_outputs"][0]["pred_logits"].shape == (2, 6, NUM_CLASSES)
    # the official denoising outputs keep only the groups
    assert outputs["dn_outputs"][0]["pred_logits"].shape[1] == outputs["dn_meta"]["dn_num_split"][0] - 6
    added = set(with_negatives) - set(plain)
    expected = {f"loss_{cls_loss}_neg_dn_{i}" for i in range(num_layers)} | {f"loss_{cls_loss}_neg_dn_pre"}
    assert added == expected and set(plain) <= set(with_negatives)
    assert all(with_negatives[k] > 0 for k in added)
    # the negatives are invisible to every other query: all the official terms stay (float noise aside)
    for key in plain:
        assert with_negatives[key].item() == pytest.approx(plain[key].item(), rel=1e-5, abs=1e-7), key


def test_negatives_are_trained_as_background(model, images):
    """Their loss pushes their scores down, scales with bg_loss_weight, and ignores invalid slots."""
    targets = _mixed_targets()
    outputs = _forward(model, images, targets, negatives=6, grad=True)
    negative_logits = [out["pred_logits"] for out in outputs["dn_negative_outputs"]]
    for logits in negative_logits:
        logits.retain_grad()
    losses = build_criterion("n", NUM_CLASSES)(outputs, targets)
    sum(v for k, v in losses.items() if "_neg_" in k).backward()
    assert all((logits.grad >= 0).all() and logits.grad.sum() > 0 for logits in negative_logits)

    detached = _forward(model, images, targets, negatives=6)
    weighted = build_criterion("n", NUM_CLASSES, bg_loss_weight=2.0)(detached, targets)
    base = build_criterion("n", NUM_CLASSES)(detached, targets)
    assert weighted["loss_vfl_neg_dn_0"].item() == pytest.approx(
        2 * base["loss_vfl_neg_dn_0"].item(), rel=1e-6
    )
    valid = detached["dn_meta"]["dn_negative_valid"]
    valid[0, :3] = False  # pretend no clear box was found for half of image 0's slots
    partial = build_criterion("n", NUM_CLASSES)(detached, targets)["loss_vfl_neg_dn_0"]
    valid[:] = False
    none = build_criterion("n", NUM_CLASSES)(detached, targets)["loss_vfl_neg_dn_0"]
    assert 0 < partial < base["loss_vfl_neg_dn_0"] and none.item() == 0


def test_negatives_on_a_background_only_batch(model, images):
    targets = [_empty_target(), _empty_target()]
    outputs = _forward(model, images, targets, negatives=5, grad=True)
    losses = build_criterion("n", NUM_CLASSES)(outputs, targets)
    negative_terms = [k for k in losses if "_neg_" in k]
    assert negative_terms and all(losses[k] > 0 for k in negative_terms)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(v.item() == 0 for k, v in losses.items() if k.split("_")[1] in {"bbox", "giou", "fgl"})
    model.zero_grad()
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the class heads learn from the negatives
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.dec_score_head.parameters()
    )
    model.zero_grad()


def test_negatives_off_gives_identical_outputs(model, images):
    targets = _mixed_targets()
    before = _forward(model, images, targets)
    _forward(model, images, targets, negatives=4)  # on, then off again (_forward switches it off)
    after = _forward(model, images, targets)
    assert model.decoder.num_dn_negatives == 0
    assert set(before) == set(after) and "dn_negative_outputs" not in after
    for key in ("pred_logits", "pred_boxes", "pred_corners"):
        assert torch.equal(before[key], after[key])
    assert torch.equal(before["dn_outputs"][-1]["pred_logits"], after["dn_outputs"][-1]["pred_logits"])
    # eval never builds denoising queries: negatives change nothing there
    model.eval()
    try:
        with torch.no_grad():
            plain = model(images)
            set_denoising_negatives(model, 4)
            on = model(images)
    finally:
        set_denoising_negatives(model, 0)
        model.train()
    assert torch.equal(plain["pred_logits"], on["pred_logits"])


def test_set_denoising_negatives_checks_its_arguments():
    no_denoising = build_model("n", NUM_CLASSES, img_size=(IMG, IMG), num_queries=10, num_denoising=0)
    with pytest.raises(ValueError, match="num_denoising > 0"):
        set_denoising_negatives(no_denoising, 5)
    set_denoising_negatives(no_denoising, 0)  # off is always fine
    with pytest.raises(ValueError, match="iou_thresh"):
        set_denoising_negatives(no_denoising, 0, iou_thresh=1.5)
