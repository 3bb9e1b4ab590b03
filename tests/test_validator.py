"""Metrics on hand-made cases with known answers, agreement with pycocotools, files, eval pictures."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from src.common.network_input import letterbox_or_resize
from src.metrics.plots import save_eval_images
from src.metrics.records import batch_records
from src.metrics.validator import MIN_DEPLOYABLE_F1, coco_dicts, coco_map, evaluate, save_thresholds

NAMES = ["cat", "dog", "fox"]


def gt(boxes, labels, **extra):
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": np.array(labels, np.int64)} | extra


def pred(boxes, labels, scores, **extra):
    return gt(boxes, labels, **extra) | {"scores": np.array(scores, np.float32)}


def check(result, **expected):
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key


def test_perfect_predictions():
    gts = [gt([[10, 10, 50, 50], [60, 60, 90, 100]], [0, 1]), gt([[5, 5, 20, 30]], [2])]
    preds = [pred(g["boxes"], g["labels"], [0.9] * len(g["labels"])) for g in gts]
    result = evaluate(preds, gts, NAMES, conf_thresh=0.5, iou_thresh=0.5)
    check(result, mAP_50=1.0, mAP_50_95=1.0, precision=1.0, recall=1.0, f1=1.0, iou=1.0, tp=3, fp=0, fn=0)
    assert result.per_class["AP50"].tolist() == [1.0, 1.0, 1.0]
    assert np.trace(result.confusion) == 3 and result.confusion.sum() == 3
    assert 0 < result.thresholds["conf_thresh"] <= 0.9 and result.thresholds["f1"] == 1.0


def test_one_false_positive_halves_precision():
    gts = [gt([[10, 10, 50, 50]], [0])]
    preds = [pred([[10, 10, 50, 50], [70, 70, 90, 90]], [0, 0], [0.9, 0.8])]
    result = evaluate(preds, gts, NAMES)
    check(result, precision=0.5, recall=1.0, f1=2 / 3, tp=1, fp=1, fn=0, mAP_50=1.0)
    assert result.confusion[3, 0] == 1  # predicted cat where there is only background


def test_misclassification_and_miss():
    gts = [gt([[10, 10, 50, 50], [60, 10, 90, 40]], [0, 1])]
    preds = [pred([[11, 10, 50, 50]], [2], [0.9])]  # a fox on the cat; the dog is missed
    result = evaluate(preds, gts, NAMES)
    check(result, precision=0.0, recall=0.0, tp=0, fp=1, fn=2, iou=0.0)
    assert result.confusion[0, 2] == 1  # true cat, predicted fox
    assert result.confusion[1, 3] == 1  # dog missed (predicted background)
    row = result.per_class.set_index("class").loc["fox"]
    assert (row.tp, row.fp, row.fn) == (0, 1, 0)


def test_conf_thresh_filters_p_r_but_not_map():
    gts = [gt([[10, 10, 50, 50]], [0])]
    preds = [pred([[10, 10, 50, 50]], [0], [0.3])]
    result = evaluate(preds, gts, NAMES, conf_thresh=0.5)
    check(result, tp=0, fp=0, fn=1, recall=0.0, mAP_50=1.0)
    assert result.thresholds["conf_thresh"] <= 0.3  # the curve finds the working threshold


def test_a_model_without_a_useful_threshold_keeps_conf_thresh():
    # One hit among 30 low-scoring misses: the best F1 (at the lowest scores) is under MIN_DEPLOYABLE_F1.
    gts = [gt([[10, 10, 50, 50]], [0]) for _ in range(10)]
    misses = [[60 + i, 60, 70 + i, 70] for i in range(3)]
    preds = [
        pred([[10, 10, 50, 50] if i == 0 else misses[0], *misses], [0] * 4, [0.02] * 4) for i in range(10)
    ]
    result = evaluate(preds, gts, NAMES, conf_thresh=0.4)
    assert 0 < result.metrics["best_f1"] < MIN_DEPLOYABLE_F1
    assert result.metrics["best_thresh"] <= 0.02  # the curve's own optimum is still reported
    assert result.thresholds["conf_thresh"] == 0.4 and set(result.thresholds["per_class"].values()) == {0.4}
    assert "kept the configured conf_thresh" in result.thresholds["fallback"]


def test_iou_of_matched_pairs_and_one_to_one_matching():
    gts = [gt([[0, 0, 10, 10]], [0])]
    # Two predictions on one object: the higher score takes it (IoU 0.8), the other is a duplicate (FP).
    preds = [pred([[0, 0, 10, 8], [0, 0, 10, 10]], [0, 0], [0.9, 0.6])]
    result = evaluate(preds, gts, NAMES, iou_thresh=0.5)
    check(result, tp=1, fp=1, fn=0, iou=0.8)


def test_best_threshold_sits_between_false_and_true_positives():
    gts = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    preds = [pred([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0, 1, 0], [0.9, 0.8, 0.3])]
    result = evaluate(preds, gts, NAMES)
    assert 0.3 < result.metrics["best_thresh"] <= 0.8 and result.metrics["best_f1"] == 1.0
    per_class = result.thresholds["per_class"]
    assert 0.3 < per_class["cat"] <= 0.9 and per_class["dog"] <= 0.8
    assert per_class["fox"] == result.metrics["best_thresh"]  # no fox anywhere: the global threshold
    curve = result.curves[result.curves["class"] == "all"].set_index("threshold")
    assert curve.loc[0.2, "precision"] == pytest.approx(2 / 3) and curve.loc[0.5, "precision"] == 1.0


def test_background_images_and_empty_inputs():
    result = evaluate([pred([], [], [])], [gt([], [])], NAMES)
    check(result, mAP_50=0.0, precision=0.0, recall=0.0, tp=0, fp=0, fn=0)
    result = evaluate([], [], NAMES)
    check(result, tp=0, fp=0, fn=0)
    result = evaluate(
        [pred([[0, 0, 5, 5]], [1], [0.9]), pred([[0, 0, 5, 5]], [1], [0.9])],
        [gt([], []), gt([[0, 0, 5, 5]], [1])],
        NAMES,
    )
    check(result, tp=1, fp=1, precision=0.5)


def test_images_gathered_twice_count_once():
    gts = [gt([[0, 0, 10, 10]], [0], image_id=7), gt([[0, 0, 10, 10]], [1], image_id=3)]
    preds = [pred([[0, 0, 10, 10]], [0], [0.9], image_id=7), pred([], [], [], image_id=3)]
    once = evaluate(preds, gts, NAMES)
    twice = evaluate(preds + preds[::-1], gts + gts[::-1], NAMES)  # e.g. DDP padding repeated them
    assert once.metrics == twice.metrics
    check(once, tp=1, fn=1)


def test_torch_inputs_are_accepted():
    gts = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}]
    preds = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10]]),
            "labels": torch.tensor([2]),
            "scores": torch.tensor([0.7]),
        }
    ]
    check(evaluate(preds, gts, NAMES), tp=1, mAP_50=1.0)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(6):
        n = rng.integers(0, 5)
        xy = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 80, (n, 2))], 1)
        labels = rng.integers(0, 3, n)
        gts.append(gt(boxes, labels))
        jitter = boxes + rng.normal(0, 6, boxes.shape)
        extra_xy = rng.uniform(0, 200, (3, 2))
        extra = np.concatenate([extra_xy, extra_xy + 30], 1)
        all_boxes = np.concatenate([jitter, extra])
        all_labels = np.concatenate(
            [np.where(rng.random(n) < 0.8, labels, (labels + 1) % 3), rng.integers(0, 3, 3)]
        )
        preds.append(pred(all_boxes, all_labels, rng.uniform(0.05, 1.0, len(all_labels))))
    return preds, gts


@pytest.mark.parametrize("seed", [0, 1])
def test_map_agrees_with_pycocotools(seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    preds, gts = _random_case(seed)
    ours = coco_map(preds, gts, len(NAMES))
    gt_dict, detections = coco_dicts(preds, gts, len(NAMES))
    coco_gt = COCO()
    coco_gt.dataset = gt_dict
    coco_gt.createIndex()
    reference = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    assert ours["mAP_50_95"] == pytest.approx(reference.stats[0], abs=1e-4)
    assert ours["mAP_50"] == pytest.approx(reference.stats[1], abs=1e-4)
    precision = reference.eval["precision"][:, :, :, 0, -1]
    for k in range(len(NAMES)):
        valid = precision[0, :, k][precision[0, :, k] > -1]
        assert ours["AP50"][k] == pytest.approx(valid.mean(), abs=1e-4)
    assert 0 < ours["mAP_50_95"] < ours["mAP_50"] < 1


def test_results_files_and_thresholds_json(tmp_path):
    preds, gts = _random_case(3)
    result = evaluate(preds, gts, NAMES)
    written = result.save(tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == [
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "per_class_metrics.csv",
        "threshold_curves.csv",
        "threshold_curves.png",
    ]
    assert all(p.stat().st_size > 0 for p in written)
    assert list(result.per_class.columns) == [
        "class", "AP50", "AP50_95", "precision", "recall", "f1", "tp", "fp", "fn", "best_thresh"
    ]  # fmt: skip
    assert result.confusion.shape == (4, 4)
    assert result.confusion[:3].sum() == sum(len(g["labels"]) for g in gts)  # every GT lands in its row
    path = save_thresholds(tmp_path / "thresholds.json", result.thresholds)
    saved = json.loads(path.read_text())
    assert saved["conf_thresh"] == result.metrics["best_thresh"] and set(saved["per_class"]) == set(NAMES)


def test_batch_records_map_network_boxes_back(tmp_path):
    image = np.zeros((100, 200, 3), np.uint8)
    _, meta = letterbox_or_resize(image, (64, 64), keep_ratio=True)  # scale 0.32, 16 px bands
    target = {
        "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.25]]),  # network cxcywh: 16..48 x 24..40 px
        "labels": torch.tensor([1]),
        "image_id": 4,
        "letterbox": meta,
        "path": str(tmp_path / "a.png"),
    }
    result = {
        "boxes": torch.tensor([[16.0, 24.0, 48.0, 40.0]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([1]),
    }
    preds, gts = batch_records([result], [target])
    np.testing.assert_allclose(gts[0]["boxes"], [[50, 25, 150, 75]], atol=1e-3)
    np.testing.assert_allclose(preds[0]["boxes"], [[50, 25, 150, 75]], atol=1e-3)
    assert gts[0]["image_id"] == preds[0]["image_id"] == 4 and (gts[0]["width"], gts[0]["height"]) == (
        200,
        100,
    )

    Image.fromarray(image).save(tmp_path / "a.png")
    saved = save_eval_images(preds, gts, tmp_path / "eval", NAMES, conf_thresh=0.5, n=4)
    assert len(saved) == 1 and saved[0].name == "000_a.jpg"
    drawn = np.asarray(Image.open(saved[0]))
    assert drawn.shape == (100, 200, 3) and drawn.max() > 0  # boxes were drawn on the original image


def test_predict_batches_with_the_real_model(tmp_path):
    """End to end on the real (untrained) model: every val image once, boxes inside the original image."""
    d_fine = pytest.importorskip("src.models")
    if not all(hasattr(d_fine, name) for name in ("build_model", "build_postprocessor")):
        pytest.skip("the model package is not complete yet")
    from torch.utils.data import DataLoader

    from src.dl.train.dataset import collate_fn
    from src.dl.train.setup import split_dataset
    from src.metrics.records import predict_batches
    from tests.helpers.train_data import IMAGES, make_dataset_images
    from tests.helpers.train_data import dataset_config as config

    torch.manual_seed(0)
    cfg = config(
        make_dataset_images(tmp_path / "data"),
        "model.img_size=[64,64]",
        "model.keep_ratio=true",
        "model.num_queries=20",
    )
    dataset = split_dataset(cfg, "val")
    model = d_fine.build_model("n", 4, img_size=(64, 64), variant="dfine", num_queries=20).eval()
    postprocessor = d_fine.build_postprocessor(4, num_top_queries=20).eval()
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    preds, gts = predict_batches(model, loader, "cpu", postprocessor, show_progress=False)
    assert [g["image_id"] for g in gts] == list(range(len(IMAGES)))
    for pred, gt_record in zip(preds, gts, strict=True):
        height, width, _ = IMAGES[gt_record["path"].split("/")[-1]]
        assert pred["boxes"].shape == (20, 4) and pred["scores"].shape == (20,)
        assert (pred["boxes"] >= 0).all() and (pred["boxes"][:, 0::2] <= width).all()
        assert (pred["boxes"][:, 1::2] <= height).all()
    result = evaluate(preds, gts, ["a", "b", "c", "d"])
    assert {"mAP_50", "mAP_50_95", "precision", "recall", "f1", "iou", "tp", "fp", "fn"} <= set(
        result.metrics
    )
