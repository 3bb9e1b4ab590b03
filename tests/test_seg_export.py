"""Segmentation export and runtime: a segment model's ONNX / OpenVINO exports carry a 4th output
"masks" (low-resolution mask logits of the kept queries), every backend turns it into the same original-size
masks (mean mask IoU against torch >= 0.99 in fp32), the export report and the precision choice judge masks
too, and a detection export is unchanged (3 outputs, no masks)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from src.common.config import load_config
from src.common.experiment import exp_dir
from src.common.masks import polygon_to_mask
from src.dl.precision import choose
from src.metrics.masks import mask_iou
from src.runtime import Detections, load_model
from src.runtime.meta import OUTPUT_NAMES, SEGMENT_OUTPUT_NAMES
from tests.helpers.deploy_data import deploy_config, make_checkpoint, make_data, tiny_model

EXPORTS = ("model.onnx", "model_fp32.xml")
TOP_K = 12  # export.max_detections of the test export: fewer than the model's 30 queries
NO_MAP_CHANGE = {"mAP_50_delta": 0.0, "mAP_50_delta_low": 0.0, "mAP_50_delta_high": 0.0}


@pytest.fixture(scope="module")
def seg_exported(tmp_path_factory):
    """A tiny segmentation experiment (D-FINE-n, 96 px, 30 queries, deterministic random weights) exported
    with a dynamic batch (max 2) to ONNX + OpenVINO fp32 returning the top TOP_K detections, parity checked
    on 4 images."""
    from src.dl import export

    root = tmp_path_factory.mktemp("seg_export")
    cfg = deploy_config(
        root,
        "model.task=segment",
        "export.dynamic_batch=true",
        "export.max_batch_size=2",
        "export.ov_fp16=false",
        f"export.max_detections={TOP_K}",
    )
    make_data(cfg)
    make_checkpoint(cfg, task="segment")
    return cfg, export.run(cfg)


def test_segment_exports_have_a_masks_output(seg_exported):
    import onnx
    import openvino as ov

    cfg, report = seg_exported
    out = exp_dir(cfg)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [o.name for o in graph.output] == list(SEGMENT_OUTPUT_NAMES)
    masks = graph.output[3].type.tensor_type
    assert masks.elem_type == onnx.TensorProto.FLOAT and len(masks.shape.dim) == 4
    assert masks.shape.dim[0].dim_param  # the batch axis is dynamic like the other outputs'
    ir = ov.Core().read_model(str(out / "model_fp32.xml"))
    assert [sorted(o.get_names()) for o in ir.outputs][3] == ["masks"]
    for name in EXPORTS:
        assert load_model(out / name).meta.task == "segment"
    assert report["onnx_slimmed"] is True  # onnxslim kept: mask logits unchanged too


def test_every_backend_gives_the_same_original_size_masks(seg_exported):
    """fp32 ONNX / OpenVINO, whose graphs compute masks for their top TOP_K detections only: the raw mask
    logits match those of torch's top TOP_K, and the Detector's masks (original size, kept detections only)
    overlap torch's with mean IoU >= 0.99, on images of other sizes and aspect ratios."""
    cfg, _ = seg_exported
    out = exp_dir(cfg)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((70, 130, 3), (96, 96, 3), (150, 60, 3))
    ]
    reference_model = load_model(out / "best.pt", device="cpu")
    reference = reference_model(images, conf=0.0)
    assert sum(int(d.masks.sum()) for d in reference) > 100  # non-trivial masks, else IoU 1 proves nothing
    raw_reference, _ = reference_model.raw(images[:2])
    for name in EXPORTS:
        model = load_model(out / name, device="cpu")
        raw, _ = model.raw(images[:2])
        assert len(raw) == 4 and raw[3].shape == (2, TOP_K, *raw_reference[3].shape[2:])  # (B, K, h/4, w/4)
        np.testing.assert_allclose(raw[3], raw_reference[3][:, :TOP_K], atol=1e-3)
        ious = []
        for ref, det, image in zip(reference, model(images, conf=0.0), images, strict=True):
            assert len(det) == TOP_K and det.masks.dtype == bool
            assert det.masks.shape == (TOP_K, *image.shape[:2])
            assert det.labels.tolist() == ref.labels[:TOP_K].tolist()
            ious.append(mask_iou(ref.masks[:TOP_K], det.masks))
        assert np.concatenate(ious).mean() >= 0.99, name


def test_deployed_mask_head_computes_the_kept_queries_logits(tmp_path):
    """Deploy mode (export and the torch runtime): the mask logits of the top-K detections, computed for
    those K queries only (K below the model's top-K, as export.max_detections sets it), equal the training
    path's logits of every query gathered at the same queries; boxes and scores are the same too."""
    import copy

    import torch

    from src.models.postprocess import PostProcessor

    model = tiny_model(deploy_config(tmp_path), task="segment")
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[96.0, 96.0], [96.0, 96.0]])
    with torch.no_grad():
        every_query = model(images)  # eval: "pred_masks" (B, Q, h, w)
        labels, boxes, scores, masks = PostProcessor(4, 30).deploy()(every_query, sizes)
        deployed = copy.deepcopy(model).deploy()
        deploy_outputs = deployed(images)
        top = PostProcessor(4, 30).deploy(max_detections=TOP_K)(deploy_outputs, sizes)
    assert "pred_masks" not in deploy_outputs  # no logits of the dropped queries are computed
    assert top[3].shape == (2, TOP_K, 24, 24)
    assert torch.equal(top[0], labels[:, :TOP_K])
    torch.testing.assert_close(top[2], scores[:, :TOP_K], atol=1e-5, rtol=0)
    torch.testing.assert_close(top[1], boxes[:, :TOP_K], atol=1e-3, rtol=0)
    torch.testing.assert_close(top[3], masks[:, :TOP_K], atol=1e-4, rtol=0)
    assert masks.std() > 0.01  # non-trivial logits, else equality proves little


def test_deploy_group_norm_equals_group_norm():
    """The mask head's deploy GroupNorm (per-channel moments, no reshape into groups) gives GroupNorm's
    numbers, on maps with a large mean (where a one-pass variance would lose digits) and a batch of 2."""
    import torch
    from torch import nn

    from src.models.mask_head import DeployGroupNorm

    torch.manual_seed(0)
    norm = nn.GroupNorm(32, 64)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    maps = torch.randn(2, 64, 20, 30) * 3 + 50
    with torch.no_grad():
        torch.testing.assert_close(DeployGroupNorm(norm)(maps), norm(maps), atol=1e-4, rtol=0)


def test_export_report_has_mask_iou(seg_exported):
    cfg, report = seg_exported
    saved = json.loads((exp_dir(cfg) / "export_report.json").read_text())
    for name in ("onnx", "ov_fp32"):
        entry = saved["parity"][name]
        assert entry["mean_mask_iou"] >= 0.99 and entry["min_mask_iou"] <= entry["mean_mask_iou"], entry
        assert entry["ok"], entry
    assert report["deployment"]["name"] in ("onnx", "ov_fp32")


def test_masks_stay_with_their_detections_through_thresholds(seg_exported):
    """A threshold keeps masks of the kept detections only, each inside its box; to_dict gives polygons."""
    cfg, _ = seg_exported
    model = load_model(exp_dir(cfg) / "model.onnx", device="cpu")
    image = np.random.default_rng(1).integers(0, 256, (80, 112, 3), dtype=np.uint8)
    everything, kept = (
        model(image, conf=0.0),
        model(image, conf=float(np.median(model(image, conf=0.0).scores))),
    )
    assert 0 < len(kept) < len(everything) and kept.masks.shape == (len(kept), 80, 112)
    np.testing.assert_array_equal(kept.masks, everything.masks[: len(kept)])  # both sorted by score
    for mask, (x0, y0, x1, y1) in zip(kept.masks, kept.boxes):
        ys, xs = np.nonzero(mask)
        if len(xs):  # random weights may leave a detection's mask empty
            assert (
                xs.min() + 0.5 >= x0
                and xs.max() + 0.5 <= x1
                and ys.min() + 0.5 >= y0
                and ys.max() + 0.5 <= y1
            )
    polygons = kept.to_dict()["polygons"]
    assert len(polygons) == len(kept)


def test_detect_export_is_unchanged(tmp_path):
    """A detection checkpoint exports the three outputs of before; its detections have no masks."""
    import onnx

    from src.dl.export import artifact_meta, export_onnx
    from src.runtime.torch_model import build_deploy_model

    cfg = deploy_config(tmp_path)
    checkpoint = make_checkpoint(cfg)
    model, meta = build_deploy_model(checkpoint)
    path = export_onnx(model, artifact_meta(meta, 1, 1), tmp_path / "model.onnx", 1, dynamic_batch=False)
    assert [o.name for o in onnx.load(str(path)).graph.output] == list(OUTPUT_NAMES)
    detector = load_model(path, device="cpu")
    assert detector.meta.task == "detect"
    dets = detector(np.full((64, 80, 3), 90, np.uint8), conf=0.0)
    assert dets.masks is None and "polygons" not in dets.to_dict()
    raw, _ = detector.raw([np.zeros((64, 64, 3), np.uint8)])
    assert len(raw) == 3

    from src.runtime.meta import write_onnx_meta

    proto = onnx.load(str(path))  # metadata claiming a segment model over a 3-output graph: named, refused
    write_onnx_meta(proto, replace(detector.meta, task="segment"))
    onnx.save(proto, str(tmp_path / "mislabelled.onnx"))
    with pytest.raises(ValueError, match="outputs .* expected .*masks.* for a segment model"):
        load_model(tmp_path / "mislabelled.onnx", device="cpu")


def test_to_dict_polygons_outline_the_masks():
    mask = polygon_to_mask(np.array([[0.1, 0.2], [0.6, 0.2], [0.6, 0.7], [0.1, 0.7]], np.float32), 50, 100)
    dets = Detections(
        np.array([[10, 10, 60, 35]], np.float32), np.array([0.9], np.float32), np.array([0]), ["a"], (50, 100),
        masks=np.stack([mask, np.zeros_like(mask)])[:1],
    )  # fmt: skip
    (polygon,) = dets.to_dict()["polygons"]
    assert np.array(polygon).min(0) == pytest.approx([0.1, 0.2], abs=0.011)
    assert np.array(polygon).max(0) == pytest.approx([0.6, 0.7], abs=0.011)
    assert polygon_to_mask(np.array(polygon), 50, 100).sum() == mask.sum()
    empty = Detections(
        dets.boxes, dets.scores, dets.labels, dets.names, (50, 100), np.zeros((1, 50, 100), bool)
    )
    assert empty.to_dict()["polygons"] == [None]


def test_precision_rule_requires_mask_iou():
    """A faster precision whose boxes hold but whose masks drift is not chosen for a segmentation model."""
    rule = load_config([]).export.precision_rule

    def entry(ms: float, mask: float) -> dict:
        return {"latency_ms_median": ms, "mAP_50_delta": 0.0, "mAP_50_delta_low": 0.0, "mAP_50_delta_high": 0.0,
                "median_iou": 1.0, "p5_iou": 1.0, "p95_score_dev": 0.0, "unmatched": 0, "compared": 50,
                "mean_mask_iou": mask, "ok": True}  # fmt: skip

    choice = choose({"ov_fp32": entry(60, 1.0), "ov_int8": entry(25, 0.9)}, {}, "auto", rule)
    assert choice["name"] == "ov_fp32"
    assert "ov_int8 fails: mean mask IoU 0.9000 < 0.98" in choice["reason"]
    assert (
        choose({"ov_fp32": entry(60, 1.0), "ov_int8": entry(25, 0.99)}, {}, "auto", rule)["name"] == "ov_int8"
    )


@pytest.mark.parametrize("keep_ratio", [True, False])
def test_masks_in_boxes_equals_whole_image_resampling(keep_ratio):
    """The Detector resamples each mask only inside its box: the same masks as masks_to_original over the
    whole image with the boxes clearing the rest (letterbox and plain resize; boxes partly outside, empty)."""
    from src.common.network_input import letterbox_or_resize, masks_in_boxes, masks_to_original

    rng = np.random.default_rng(0)
    _, letterbox = letterbox_or_resize(np.zeros((70, 130, 3), np.uint8), (96, 96), keep_ratio)
    logits = rng.normal(0, 1, (12, 12, 12)).astype(np.float32)  # (K, h, w): stride 8
    corners = rng.uniform(-10, 140, (12, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], 1).astype(np.float32)  # (K, 4) xyxy
    boxes[0] = [20.5, 10.5, 20.5, 30.0]  # zero width
    boxes[1] = [0, 0, 130, 70]  # the whole image
    boxes[2] = [3.49, 7.51, 50.5, 40.49]  # edges next to pixel centres
    expected = masks_to_original(logits, letterbox, boxes_xyxy=boxes).numpy()
    masks = masks_in_boxes(logits, letterbox, boxes)
    assert masks.shape == expected.shape == (12, 70, 130) and masks[1].any()
    assert (masks != expected).sum() <= 2  # float rounding of a sample point at logit ~0 at most


def test_test_batching_runs_a_segment_export(seg_exported):
    from src.dl import test_batching

    cfg, _ = seg_exported
    options = ("test_batching.batch_sizes=[1,2]", "test_batching.runs=1", "test_batching.warmup=1")
    model_path = f"test_batching.model_path={exp_dir(cfg) / 'model.onnx'}"
    frame = test_batching.run(deploy_config(exp_dir(cfg).parents[1], *options, model_path))
    assert frame["status"].tolist() == ["ok", "ok"]


def test_int8_of_a_segment_model_reports_mask_iou(seg_exported):
    from src.dl import ov_int8

    cfg, _ = seg_exported
    cfg = deploy_config(
        exp_dir(cfg).parents[1], "model.task=segment", "ov_int8.subset_size=4", "ov_int8.val_images=3"
    )
    report = ov_int8.run(cfg)
    int8 = report["results"][1]
    assert (
        0.0 <= int8["min_mask_iou"] <= int8["mean_mask_iou"] <= 1.0
        and "mean_mask_iou" not in report["results"][0]
    )
    detector = load_model(exp_dir(cfg) / "model_int8.xml", device="cpu")
    assert (
        detector.meta.task == "segment"
        and detector(np.zeros((64, 64, 3), np.uint8), conf=0.0).masks is not None
    )


def test_parity_flags_masks_that_drift_while_boxes_hold():
    """Same boxes and scores, masks shifted by 3 px: box parity holds, mask IoU breaks the fp32 tolerance;
    the masks as an evaluation keeps them (per-image RLEs) give the same numbers."""
    from src.common.config import load_config
    from src.dl.parity import beyond_tolerance, compare_detections
    from src.metrics.masks import encode_masks

    boxes = np.array([[10, 10, 40, 40], [50, 20, 90, 60]], np.float32)
    masks = np.zeros((2, 100, 100), bool)
    masks[0, 12:38, 12:38], masks[1, 22:58, 52:88] = True, True

    def dets(mask_array):
        return Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([0, 1]), ["a", "b"], (100, 100),
                          masks=mask_array)  # fmt: skip

    shifted = np.roll(masks, 3, axis=2)
    tolerance = load_config([]).export.tolerance.fp32
    same = compare_detections([dets(masks)], [dets(masks.copy())], conf=0.3)
    drift = compare_detections([dets(masks)], [dets(shifted)], conf=0.3)
    assert same["mean_mask_iou"] == 1.0 and not beyond_tolerance(same, NO_MAP_CHANGE, tolerance)
    assert drift["max_box_dev_px"] == 0.0 and drift["mean_mask_iou"] < 0.9
    expected = [f"mean mask IoU {drift['mean_mask_iou']:.4g} < 0.98"]
    assert beyond_tolerance(drift, NO_MAP_CHANGE, tolerance) == expected
    no_masks = [dets(None)]
    from_rles = compare_detections(
        no_masks, no_masks, conf=0.3, mask_rles=([encode_masks(masks)], [encode_masks(shifted)])
    )
    assert from_rles["mean_mask_iou"] == pytest.approx(drift["mean_mask_iou"])
    assert "mean_mask_iou" not in compare_detections(no_masks, no_masks, conf=0.3)  # detection models
