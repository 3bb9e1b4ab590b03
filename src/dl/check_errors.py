"""Find the images where the model and the labels disagree, to catch mislabelled samples.

    python -m src.dl.check_errors exp_name=my_run [check_errors.splits=[val] check_errors.iou_thresh=0.5]

For each split, every image with a false positive (a prediction at the model's threshold matching no
ground-truth box of its class) or a false negative (a ground-truth box no prediction matched) is drawn
once with all its errors: FN ground truth in green, FP predictions in red (with scores), correct boxes
thin grey. output/<exp>/check_errors/errors.csv lists every FP/FN worst first: a confident FP (often an
unlabelled object) or a FN nothing overlaps (often a wrong or stray label) comes before borderline cases.

Pictures are named after the image's path (src/runtime/outputs.py: images of the same name in different
folders keep apart); a run replaces only the files check_errors wrote before (src/dl/stage_outputs.py).

A segmentation model is matched by mask IoU (an object labelled by a box line, without a polygon, by box
IoU), best_iou is that IoU, and the pictures fill the FN ground-truth masks green and the FP masks red.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from src.common.config import stage_main
from src.common.draw import GT_COLOR, PRED_COLOR, draw_detections, draw_masks, save_image_rgb
from src.common.experiment import Experiment, stage_config
from src.common.io import atomic_write_csv
from src.dl.artifacts import load_experiment_model
from src.dl.split_samples import full_image_config, load_split_samples
from src.dl.stage_outputs import StagedOutputs
from src.metrics import matching
from src.metrics.masks import mask_iou_matrix
from src.metrics.matching import greedy_match, score_order
from src.runtime.detector import BOX_DECIMALS, SCORE_DECIMALS, Detections, read_each
from src.runtime.evaluate import LabelledImage
from src.runtime.outputs import OutputNames

CONTEXT_COLOR = (160, 160, 160)
COLUMNS = [
    "image", "split", "kind", "class_id", "class_name", "score", "x1", "y1", "x2", "y2",
    "best_iou", "best_iou_class", "severity", "picture",
]  # fmt: skip


def find_errors(
    dets: Detections, sample: LabelledImage, iou_thresh: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FP mask over predictions, FN mask over GT, IoU matrix preds x GT) with the validator's matching:
    each prediction, best score first, takes the unmatched GT of its class with the highest IoU."""
    iou = iou_matrix(dets, sample)
    same_class = dets.labels[:, None] == sample.labels[None, :]
    matched_gt, _ = greedy_match(iou, score_order(dets.scores), same_class, iou_thresh)
    fn = np.ones(len(sample.labels), bool)
    fn[matched_gt[matched_gt >= 0]] = False
    return matched_gt < 0, fn, iou


def iou_matrix(dets: Detections, sample: LabelledImage) -> np.ndarray:
    """(N, M) IoU of predictions with ground truth: of boxes, or of masks for a segmentation model's
    predictions and the GT objects labelled by a polygon (box-line objects keep box IoU)."""
    iou = matching.iou_matrix(dets.boxes.astype(np.float64), sample.boxes)
    has_mask = sample.has_mask
    if dets.masks is None or not has_mask.any() or not len(dets):
        return iou
    iou[:, has_mask] = mask_iou_matrix(dets.masks, sample.masks(*dets.image_size)[has_mask])
    return iou


def error_rows(
    dets: Detections, sample: LabelledImage, fp, fn, iou, names: list[str], picture: str
) -> list[dict]:
    """One row per error. best_iou: overlap with the nearest box on the other side (any class)."""
    rows = []
    base = {"image": str(sample.path), "split": sample.split, "picture": picture}
    for p in np.where(fp)[0]:
        best = int(iou[p].argmax()) if iou.shape[1] else -1
        best_iou = float(iou[p, best]) if best >= 0 else 0.0
        rows.append(base | _box(dets.boxes[p]) | {
            "kind": "FP", "class_id": int(dets.labels[p]), "class_name": names[dets.labels[p]],
            "score": float(dets.scores[p]), "best_iou": best_iou,
            "best_iou_class": names[sample.labels[best]] if best >= 0 and best_iou > 0 else "",
            "severity": float(dets.scores[p]),  # a confident FP is the most suspicious (missing label?)
        })  # fmt: skip
    for g in np.where(fn)[0]:
        best = int(iou[:, g].argmax()) if iou.shape[0] else -1
        best_iou = float(iou[best, g]) if best >= 0 else 0.0
        rows.append(base | _box(sample.boxes[g]) | {
            "kind": "FN", "class_id": int(sample.labels[g]), "class_name": names[sample.labels[g]],
            "score": float(dets.scores[best]) if best >= 0 and best_iou > 0 else np.nan, "best_iou": best_iou,
            "best_iou_class": names[dets.labels[best]] if best >= 0 and best_iou > 0 else "",
            "severity": 1.0 - best_iou,  # a GT box nothing overlaps is the most suspicious (wrong label?)
        })  # fmt: skip
    return rows


def _box(box) -> dict[str, float]:
    return dict(zip(("x1", "y1", "x2", "y2"), (float(v) for v in box), strict=True))


def for_csv(frame: pd.DataFrame) -> pd.DataFrame:
    """errors.csv values: box pixels and scores rounded like every other output (src/runtime/detector.py),
    so float32 noise (0.30000001192092896) never reaches the file."""
    decimals = {c: BOX_DECIMALS for c in ("x1", "y1", "x2", "y2")}
    return frame.round(decimals | {c: SCORE_DECIMALS for c in ("score", "best_iou", "severity")})


def draw_errors(
    image: np.ndarray, dets: Detections, sample: LabelledImage, fp, fn, names: list[str]
) -> np.ndarray:
    """Correct boxes thin grey (context), FN ground truth green, FP predictions red with scores; for a
    segmentation model the FN masks (objects with a polygon) and FP masks are filled in the same colours."""
    picture = image
    if dets.masks is not None:
        fn_masks = sample.masks(*image.shape[:2])[fn & sample.has_mask]
        picture = draw_masks(picture, fn_masks, np.zeros(len(fn_masks), np.int64), color=GT_COLOR)
        picture = draw_masks(picture, dets.masks[fp], dets.labels[fp], color=PRED_COLOR)
    correct_gt = ~fn
    picture = draw_detections(picture, sample.boxes[correct_gt], sample.labels[correct_gt], color=CONTEXT_COLOR, line_width=1, show_labels=False)  # fmt: skip
    picture = draw_detections(
        picture, sample.boxes[fn], sample.labels[fn], None, [f"FN {n}" for n in names], color=GT_COLOR
    )
    return draw_detections(
        picture,
        dets.boxes[fp],
        dets.labels[fp],
        dets.scores[fp],
        [f"FP {n}" for n in names],
        color=PRED_COLOR,
    )


def check_split(
    cfg: DictConfig, detector, split: str, staging: Path, out_dir: Path
) -> tuple[list[dict], int]:
    """Errors of one split: pictures written under staging/<split>/, rows naming them at out_dir/<split>/."""
    samples = load_split_samples(cfg, split, limit=cfg.check_errors.max_images)
    if not samples:
        logger.info(f"check_errors: no {split} split, skipped")
        return [], 0
    conf = cfg.check_errors.conf
    conf = OmegaConf.to_container(conf) if OmegaConf.is_config(conf) else conf
    iou_thresh = float(cfg.check_errors.iou_thresh)
    names, root = OutputNames.of_files(sample.path for sample in samples)
    rows, pictures = [], 0
    progress = tqdm(samples, desc=f"check {split}", dynamic_ncols=True)
    readable = read_each(progress, lambda sample: sample.read_image())
    for sample, image, dets in detector.stream(readable, conf):
        fp, fn, iou = find_errors(dets, sample, iou_thresh)
        if not (fp.any() or fn.any()):
            continue
        name = names.in_folder(split, sample.path.relative_to(root), ".jpg")
        save_image_rgb(staging / name, draw_errors(image, dets, sample, fp, fn, detector.class_names))
        pictures += 1
        rows += error_rows(dets, sample, fp, fn, iou, detector.class_names, str(out_dir / name))
    logger.info(f"check_errors {split}: {pictures}/{len(samples)} images with errors")
    return rows, pictures


def run(cfg: DictConfig) -> pd.DataFrame:
    cfg = stage_config(cfg)
    options = cfg.check_errors
    detector = load_experiment_model(cfg, options.model_path, options.precision)
    out_dir = Experiment.of(cfg).file("check_errors")
    rows: list[dict[str, Any]] = []
    images_cfg = full_image_config(cfg)  # trained on tiles: the full images (cfg's keys, resolved)
    with StagedOutputs(out_dir, "check_errors") as staging:
        for split in options.splits:
            rows += check_split(images_cfg, detector, str(split), staging.path, out_dir)[0]
        frame = pd.DataFrame(rows, columns=COLUMNS)
        if len(frame):
            frame = frame.sort_values(
                ["severity", "kind"], ascending=[False, True], kind="stable", ignore_index=True
            )
        atomic_write_csv(staging.path / "errors.csv", for_csv(frame))
        staging.commit()
    counts = frame.groupby(["split", "kind"]).size().to_dict() if len(frame) else {}
    logger.info(f"check_errors: {len(frame)} errors {counts} -> {out_dir / 'errors.csv'}")
    return frame


main = stage_main(run)

if __name__ == "__main__":
    main()
