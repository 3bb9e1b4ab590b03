"""The segmentation model side: mask branch shapes, mask loss, detection outputs untouched,
postprocessing of masks back to the original image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from src.common.config import load_config
from src.common.network_input import Letterbox, letterbox_or_resize, masks_to_original
from src.models import build_criterion, build_model, build_postprocessor
from src.models.mask_head import MASK_EMBEDDING, PIXEL_EMBEDDING, mask_logits
from src.models.mask_loss import MaskLossSettings, point_sample, uncertain_points

NUM_CLASSES = 2
QUERIES = 30


def _mask_loss_settings() -> dict:
    return dict(load_config().train.mask_loss)


def _polygon_sample(size: int, seed: int) -> tuple[torch.Tensor, dict]:
    """One (3, size, size) image with 2-3 filled random polygons and its targets (masks from the polygons)."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 40, np.uint8)
    labels, boxes, masks = [], [], []
    for _ in range(int(rng.integers(2, 4))):
        centre = rng.uniform(0.3, 0.7, 2) * size
        angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
        radii = rng.uniform(0.1, 0.25, 6) * size
        points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [points.round().astype(np.int32)], 1)
        label = int(rng.integers(0, NUM_CLASSES))
        image[mask > 0] = (200, 80, 80) if label == 0 else (80, 200, 80)
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        boxes.append([(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size])
        labels.append(label)
        masks.append(mask.astype(bool))
    tensor = torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255
    target = {
        "labels": torch.tensor(labels),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "masks": torch.from_numpy(np.stack(masks)),
    }
    return tensor, target


@pytest.mark.parametrize("size", ["n", "s", "m", "l", "x"])
def test_mask_branch_output_shapes(size):
    torch.manual_seed(0)
    model = build_model(size, NUM_CLASSES, img_size=(64, 96), num_queries=QUERIES, task="segment").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 96))
    assert set(out) == {"pred_logits", "pred_boxes", "pred_masks"}
    # Stride 4 for every size: n's encoder starts at 1/16, the backbone's stride-4 stage gives the detail.
    assert out["pred_masks"].shape == (2, QUERIES, 64 // 4, 96 // 4)
    assert model.task == "segment" and model.mask_head.mask_stride == 4


def test_the_pixel_embedding_reads_the_backbone_stride_4_stage():
    """HGNetv2.stage_outputs gives every stage (strides 4..32) and forward stays its return_idx selection
    (bit for bit: a detector is unchanged); the mask branch projects the stride-4 one, starting at zero
    weight, so a fresh branch begins as the upsampled encoder map and learns how much detail to add."""
    torch.manual_seed(0)
    model = build_model("n", NUM_CLASSES, img_size=(64, 64), num_queries=QUERIES, task="segment").eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        stages = model.backbone.stage_outputs(images)
        selected = model.backbone(images)
    assert [tuple(map(int, s.shape[1:])) for s in stages] == [
        (c, 64 // stride, 64 // stride) for c, stride in zip(model.backbone.stage_channels, (4, 8, 16, 32))
    ]
    assert all(torch.equal(stages[i], got) for i, got in zip(model.backbone.return_idx, selected))
    detail = model.mask_head.pixel_embedding.detail
    assert detail[0].in_channels == model.backbone.stage_channels[0] and not detail[1].weight.any()


def test_detection_outputs_unchanged_by_the_mask_branch():
    """The same weights give the same boxes and scores with and without the mask branch (eval and train),
    and a detector has neither mask parameters nor mask outputs."""
    torch.manual_seed(0)
    detector = build_model("n", NUM_CLASSES, img_size=(128, 128), num_queries=QUERIES)
    segmenter = build_model("n", NUM_CLASSES, img_size=(128, 128), num_queries=QUERIES, task="segment")
    missing, unexpected = segmenter.load_state_dict(detector.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("mask_head.") for name in missing)
    assert detector.task == "detect" and not any(
        name.startswith("mask_head") for name in detector.state_dict()
    )

    images = torch.rand(2, 3, 128, 128)
    targets = [_polygon_sample(128, seed)[1] for seed in range(2)]
    for training in (False, True):
        detector.train(training), segmenter.train(training)
        torch.manual_seed(1)  # the same denoising queries for both
        expected = detector(images, targets)
        torch.manual_seed(1)
        got = segmenter(images, targets)
        assert set(got) - set(expected) == {"pred_masks"}
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(expected[key], got[key]), (training, key)
        if training:
            assert torch.equal(expected["dn_outputs"][-1]["pred_boxes"], got["dn_outputs"][-1]["pred_boxes"])
    assert "query_features" not in expected


def test_segmentation_training_steps_reduce_the_loss():
    """Model + criterion + backward on tiny polygon data: finite losses with mask terms, gradients in the
    mask branch, and the loss going down over a few steps on the same batch."""
    torch.manual_seed(0)
    model = build_model("n", NUM_CLASSES, img_size=(128, 128), num_queries=QUERIES, task="segment")
    criterion = build_criterion("n", NUM_CLASSES, mask_loss=_mask_loss_settings())
    samples = [_polygon_sample(128, seed) for seed in range(2)]
    images = torch.stack([image for image, _ in samples])
    targets = [target for _, target in samples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    totals = []
    for step in range(3):
        losses = criterion(model(images, targets), targets)
        assert {"loss_mask_bce", "loss_mask_dice"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_mask_bce"] > 0 and losses["loss_mask_dice"] > 0
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        if step == 0:
            grads = [p.grad for p in model.mask_head.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
        optimizer.step()
        totals.append(float(total.detach()))
    assert totals[-1] < totals[0], totals


def test_box_only_objects_get_no_mask_loss():
    torch.manual_seed(0)
    model = build_model("n", NUM_CLASSES, img_size=(128, 128), num_queries=QUERIES, task="segment").train()
    criterion = build_criterion("n", NUM_CLASSES, mask_loss=_mask_loss_settings())
    image, target = _polygon_sample(128, 0)
    box_only = {**target, "has_mask": torch.zeros(len(target["labels"]), dtype=torch.bool)}
    no_masks = {key: value for key, value in target.items() if key != "masks"}
    for targets in ([box_only], [no_masks]):
        losses = criterion(model(image[None], targets), targets)
        assert float(losses["loss_mask_bce"].detach()) == 0 == float(losses["loss_mask_dice"].detach())
        assert float(losses["loss_bbox"].detach()) > 0  # box losses still apply

    # One of the objects flagged: the loss equals the loss over the others only.
    flags = torch.ones(len(target["labels"]), dtype=torch.bool)
    flags[0] = False
    outputs = model(image[None], [target])
    partial = {**target, "has_mask": flags}
    from src.models.mask_loss import matched_masks

    match = criterion.matcher(outputs, [partial])
    preds, masks = matched_masks(outputs["pred_masks"], [partial], match)
    assert len(preds) == len(target["labels"]) - 1 == len(masks)
    assert masks.shape[-2:] == (128, 128)


def test_a_detection_criterion_refuses_mask_outputs():
    model = build_model("n", NUM_CLASSES, img_size=(128, 128), num_queries=QUERIES, task="segment").train()
    image, target = _polygon_sample(128, 0)
    with pytest.raises(ValueError, match="mask_loss"):
        build_criterion("n", NUM_CLASSES)(model(image[None], [target]), [target])


def test_point_sampling_reads_pixel_centres_and_prefers_uncertain_points():
    maps = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    centres = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3], [1.5 / 4, 1.5 / 3]]])
    assert torch.allclose(point_sample(maps, centres)[0, 0], torch.tensor([0.0, 11.0, 5.0]), atol=1e-5)

    settings = MaskLossSettings(bce=1, dice=1, points=64, oversample_ratio=3, importance_sample_ratio=1.0)
    ramp = (torch.arange(16.0) + 0.5) / 16 - 0.5  # logit 0 (the most uncertain) at x = 0.5
    logits = (ramp * 20).expand(1, 1, 16, 16)
    coords = uncertain_points(logits, settings, 64)
    assert coords.shape == (1, 64, 2)
    # The third of the candidates nearest x = 0.5: about 0.08 away on average; uniform points: 0.25.
    assert (coords[0, :, 0] - 0.5).abs().mean() < 0.12


def test_postprocessor_keeps_the_masks_of_kept_queries():
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 2, 1] = 5.0  # query 2, class 1 is the best
    logits[0, 0, 0] = 3.0
    outputs = {
        "pred_logits": logits,
        "pred_boxes": torch.rand(1, 4, 4),
        "pred_masks": torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 3, 5),
    }
    result = build_postprocessor(2, num_top_queries=2)(outputs, torch.tensor([[100, 60]]))[0]
    assert result["masks"].shape == (2, 3, 5)
    assert result["masks"][:, 0, 0].tolist() == [2.0, 0.0]  # query 2 first, then query 0
    labels, boxes, scores, masks = build_postprocessor(2, 2).deploy()(outputs, torch.tensor([[100, 60]]))
    assert torch.equal(masks[0], result["masks"])
    detection = {k: v for k, v in outputs.items() if k != "pred_masks"}
    assert set(build_postprocessor(2, 2)(detection, torch.tensor([[100, 60]]))[0]) == {
        "labels",
        "boxes",
        "scores",
    }


@pytest.mark.parametrize("keep_ratio", [True, False])
def test_masks_to_original_undoes_letterbox_and_resize(keep_ratio):
    """A rectangle drawn in the original image comes back where it was, through a 1/4-resolution logit map
    of the letterboxed (or resized) network input."""
    original = np.zeros((90, 160, 3), np.uint8)
    original[20:60, 40:120] = 255
    net, meta = letterbox_or_resize(original, (64, 64), keep_ratio)
    low = cv2.resize(net[..., 0].astype(np.float32), (16, 16), interpolation=cv2.INTER_AREA)
    logits = torch.from_numpy(low / 255.0 * 20 - 10)[None]  # (1, 16, 16): > 0 inside the rectangle
    mask = masks_to_original(logits, meta)[0].numpy()
    assert mask.shape == (90, 160)
    expected = original[..., 0] > 0
    iou = (mask & expected).sum() / (mask | expected).sum()
    assert iou > 0.9, iou

    # Cropped to a box covering the left half of the rectangle: the right half is cleared.
    cropped = masks_to_original(logits, meta, boxes_xyxy=[[0, 0, 80, 90]])[0].numpy()
    assert cropped[:, :80].sum() == mask[:, :80].sum() > 0 and not cropped[:, 80:].any()

    identity = masks_to_original(np.full((2, 8, 8), 1.0, np.float32), Letterbox.identity(32, 32))
    assert identity.shape == (2, 32, 32) and bool(identity.all())


def test_a_detection_checkpoint_loads_into_a_segmentation_model():
    from src.models import load_pretrained

    torch.manual_seed(0)
    detector = build_model("n", NUM_CLASSES, img_size=(128, 128), num_queries=QUERIES)
    segmenter = build_model("n", NUM_CLASSES, img_size=(128, 128), num_queries=QUERIES, task="segment")
    report = load_pretrained(segmenter, detector.state_dict())
    assert report.missing and all(key.startswith("mask_head.") for key in report.missing)
    assert "mask branch not in the checkpoint: it starts fresh" in str(report)
    assert "missing in the checkpoint" not in str(report)
    assert torch.equal(segmenter.decoder.enc_score_head.weight, detector.decoder.enc_score_head.weight)


def test_deployed_segmentation_model_keeps_its_outputs():
    torch.manual_seed(0)
    model = build_model("s", NUM_CLASSES, img_size=(64, 64), num_queries=QUERIES, task="segment").eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        got = model.deploy()(images)
        # deploy mode hands over the two embeddings; the postprocessor takes their product for kept queries
        got["pred_masks"] = mask_logits(got[MASK_EMBEDDING], got[PIXEL_EMBEDDING])
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.allclose(expected[key], got[key], atol=1e-4), key


def test_model_spec_task_builds_the_mask_branch_and_round_trips():
    from src.common.errors import ConfigError
    from src.models import LossSettings, ModelSpec, build

    fields = dict(
        arch="dfine", size="n", img_size=(128, 128), data_class_names=("a", "b"), num_queries=QUERIES
    )
    spec = ModelSpec(**fields, task="segment")
    model, criterion, _ = build(spec, LossSettings(mask_loss=_mask_loss_settings()))
    assert model.task == "segment" and criterion.mask_loss is not None
    assert build(ModelSpec(**fields)).model.task == "detect"
    assert ModelSpec.from_meta(spec.to_meta()) == spec
    before_segmentation = {k: v for k, v in spec.to_meta().items() if k != "task"}
    assert ModelSpec.from_meta(before_segmentation).task == "detect"
    with pytest.raises(ConfigError, match="model.task"):
        ModelSpec(**fields, task="panoptic")
    assert ModelSpec.from_config(load_config(["model.task=segment"])).task == "segment"
