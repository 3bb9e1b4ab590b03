"""Export parity: how far each exported artifact's detections drift from the torch model's on val images.

Used by src.dl.export (export_report.json) and src.dl.ov_int8 (int8 vs fp32). Detections are paired
one-to-one per image (same class, IoU >= 0.5, the validator's matching) over the unthresholded top-K.
A segmentation model's pairs are also compared by mask: mean / min mask IoU (metrics.masks.mask_iou) of
the paired detections' original-size masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from src.runtime import load_model

LOUD = "!" * 100
PARITY_WARMUP = 2  # untimed runs before the latency each deployment is chosen by
MIN_PARITY_DETECTIONS = 10  # fewer compared detections than this: the box/score check says little
# compared: detections >= conf in either model (a pair counts once); *_detections: >= conf in each model;
# unmatched / borderline: see compare_detections
PARITY_COUNTS = ("compared", "unmatched", "borderline", "reference_detections", "artifact_detections")


def loud_error(message: str) -> None:
    """An error nobody scrolls past: a result that must not be used silently."""
    logger.error(f"\n{LOUD}\n{message}\n{LOUD}")


# ---------------------------------------------------------------------------------------------------- parity


def pair_detections(reference, candidate, iou_thresh: float) -> np.ndarray:
    """Index of the `candidate` detection paired with each `reference` detection of one image (-1: none).

    One-to-one, same class, IoU >= iou_thresh: the validator's matching (src/metrics/matching.py), reference
    detections visited from the highest score down, each taking the free candidate box it overlaps most.
    """
    from src.metrics.matching import greedy_match, iou_matrix, score_order

    iou = iou_matrix(reference.boxes, candidate.boxes)
    same_class = reference.labels[:, None] == candidate.labels[None, :]
    paired, _ = greedy_match(iou, score_order(reference.scores), same_class, iou_thresh)
    return paired


def deviation_stats(values: list[np.ndarray], name: str) -> dict[str, float]:
    """max / p99 / mean of a deviation over every compared pair (0 when nothing was compared)."""
    flat = np.concatenate([np.zeros(0), *values])
    if not flat.size:
        return {f"max_{name}": 0.0, f"p99_{name}": 0.0, f"mean_{name}": 0.0}
    return {
        f"max_{name}": float(flat.max()),
        f"p99_{name}": float(np.percentile(flat, 99)),
        f"mean_{name}": float(flat.mean()),
    }


def compare_detections(
    reference,
    candidate,
    conf: float | np.ndarray = 0.0,
    margin: float = 0.0,
    iou_thresh: float = 0.5,
    mask_rles: tuple[Sequence | None, Sequence | None] = (None, None),
) -> dict[str, float]:
    """How far `candidate` drifts from `reference`: lists of Detections of the same images, best given
    UNthresholded (every top-K detection, so that a detection whose score crosses `conf` between the two
    models still finds its counterpart instead of being counted missing or paired with another box).

    conf: one threshold or per-class thresholds (C,). Detections are paired one-to-one per image by class
    and IoU (pair_detections). Compared: the pairs where either side scores >= conf. Box deviation: largest
    coordinate difference of a pair in original pixels; score deviation: |score difference|.
    Unmatched: a detection CLEARLY present in one model whose counterpart is absent in the other (no pair,
    or scoring < conf): an object that appears or disappears. Clearly = score >= conf + margin, and >= the
    other model's top-K cut (its lowest score) + margin: a detection at the cut may simply have been ranked
    out of the other's top-K. Borderline: the same within the margin, e.g. a score of 0.31 in torch and
    0.29 in fp16 at conf 0.3: counted, never an error.
    Masks (segmentation): the compared pairs' masks, from each Detections' masks or, as an evaluation keeps
    them, from per-image COCO RLEs (mask_rles: (reference's, candidate's), EvalResult.mask_rles), of which
    only the paired detections' are decoded.
    """
    from src.metrics.masks import mask_iou

    box_devs, score_devs, ious, mask_ious = [], [], [], []
    counts = dict.fromkeys(PARITY_COUNTS, 0)
    ref_rles, cand_rles = (rles if rles is not None else [None] * len(reference) for rles in mask_rles)
    for ref, cand, ref_rle, cand_rle in zip(reference, candidate, ref_rles, cand_rles, strict=True):
        ref_partner = pair_detections(ref, cand, iou_thresh)  # (R,) index into cand, -1: none
        cand_partner = np.full(len(cand), -1)  # (C,) the inverse pairing
        cand_partner[ref_partner[ref_partner >= 0]] = np.where(ref_partner >= 0)[0]
        ref_conf, cand_conf = ref.held_to(conf), cand.held_to(conf)
        ref_kept, cand_kept = ref.scores >= ref_conf, cand.scores >= cand_conf
        # Is each detection's counterpart kept? (a pair has one class, hence one threshold)
        ref_other_kept = counterpart_scores(ref_partner, cand.scores) >= ref_conf
        cand_other_kept = counterpart_scores(cand_partner, ref.scores) >= cand_conf
        pairs = np.where((ref_partner >= 0) & (ref_kept | ref_other_kept))[0]
        box_devs.append(np.abs(ref.boxes[pairs] - cand.boxes[ref_partner[pairs]]).max(1, initial=0.0))
        score_devs.append(np.abs(ref.scores[pairs] - cand.scores[ref_partner[pairs]]))
        ious.append(pair_iou(ref.boxes[pairs], cand.boxes[ref_partner[pairs]]))
        ref_masks, cand_masks = (
            paired_masks(ref, ref_rle, pairs),
            paired_masks(cand, cand_rle, ref_partner[pairs]),
        )
        if ref_masks is not None and cand_masks is not None:  # segmentation: the pairs' masks too
            mask_ious.append(mask_iou(ref_masks, cand_masks))
        gone, new = ref_kept & ~ref_other_kept, cand_kept & ~cand_other_kept
        ref_bar = np.maximum(ref_conf, top_k_cut(cand)) + margin
        cand_bar = np.maximum(cand_conf, top_k_cut(ref)) + margin
        clearly = int((ref.scores >= ref_bar)[gone].sum() + (cand.scores >= cand_bar)[new].sum())
        counts["unmatched"] += clearly
        counts["borderline"] += int(gone.sum() + new.sum()) - clearly
        unpaired = int((ref_kept & (ref_partner < 0)).sum() + (cand_kept & (cand_partner < 0)).sum())
        counts["compared"] += len(pairs) + unpaired
        counts["reference_detections"] += int(ref_kept.sum())
        counts["artifact_detections"] += int(cand_kept.sum())
    paired_iou = np.concatenate([np.ones(0), *ious])
    # mean IoU of the compared pairs (1.0 when nothing was compared: no box moved)
    mean_iou = float(paired_iou.mean()) if paired_iou.size else 1.0
    drift = {
        **deviation_stats(box_devs, "box_dev_px"),
        **deviation_stats(score_devs, "score_dev"),
        "mean_iou": mean_iou,
        "min_iou": float(paired_iou.min(initial=1.0)),
    }
    if mask_ious:  # both sides segment: the same pairs by mask (1.0 when nothing was compared)
        paired_mask_iou = np.concatenate(mask_ious)
        drift["mean_mask_iou"] = float(paired_mask_iou.mean()) if paired_mask_iou.size else 1.0
        drift["min_mask_iou"] = float(paired_mask_iou.min(initial=1.0))
    return drift | counts


def paired_masks(dets, rles: list[dict] | None, index: np.ndarray) -> np.ndarray | None:
    """(n, H, W) bool masks of detections `index` of one image (None: a detection model)."""
    if rles is not None:
        from src.runtime.evaluate import decode_masks

        return decode_masks([rles[i] for i in index], dets.image_size)
    return None if dets.masks is None else dets.masks[index]


def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of row i of a with row i of b: (N, 4) xyxy each -> (N,)."""
    top_left, bottom_right = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(1)
    area = lambda boxes: np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(1)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)


def top_k_cut(dets) -> float:
    """Lowest score an unthresholded top-K list kept (0 when empty): below it, a detection is not output."""
    return float(dets.scores.min()) if len(dets) else 0.0


def counterpart_scores(partner: np.ndarray, other_scores: np.ndarray) -> np.ndarray:
    """Score of each detection's counterpart in the other model (-1 where it has none)."""
    scores = np.full(len(partner), -1.0)
    scores[partner >= 0] = other_scores[partner[partner >= 0]]
    return scores


def beyond_tolerance(drift: dict[str, float], delta_map: float, tolerance) -> list[str]:
    """What makes an artifact broken (empty: it is faithful). Box and score drift are judged on their 99th
    percentile over the compared pairs (the max is reported too): one odd pair among hundreds is noise, a
    broken artifact moves them all. A segmentation model's paired masks must overlap by tolerance.mask_iou
    on average."""
    checks = [
        ("p99 box dev", drift["p99_box_dev_px"], tolerance.box_px, "px"),
        ("p99 score dev", drift["p99_score_dev"], tolerance.score, ""),
        ("|mAP50 delta|", abs(delta_map), tolerance.map50, ""),
        ("unmatched fraction", drift["unmatched"] / max(1, drift["compared"]), tolerance.unmatched_frac, ""),
    ]
    problems = [
        f"{name} {value:.4g}{unit} > {limit}{unit}" for name, value, limit, unit in checks if value > limit
    ]
    if "mean_mask_iou" in drift and drift["mean_mask_iou"] < tolerance.mask_iou:
        problems.append(f"mean mask IoU {drift['mean_mask_iou']:.4g} < {tolerance.mask_iou}")
    return problems


def parity_report(
    cfg: DictConfig, deployments: dict[str, tuple[Path, str | None]], torch_path: Path, device: str
) -> dict[str, Any]:
    """Run every deployment (name -> (file, runtime precision)) and the torch model on val images: drift,
    mean IoU of paired boxes, mAP50 and latency (median, one image at a time after warm-up) per deployment."""
    from src.dl.split_samples import load_split_samples
    from src.runtime.evaluate import evaluate_detector

    samples = load_split_samples(cfg, "val", limit=int(cfg.export.parity_images))
    if not samples:
        reason = f"no val images in {cfg.splits_dir} (data_path={cfg.data_path}): export parity NOT checked"
        loud_error(f"{reason}; run `make split` on the experiment's data, then export again")
        return {"skipped": reason}
    parity_conf = float(cfg.export.parity_conf)
    images = [s.read_image() for s in samples]  # decoded once for every model
    # Unthresholded (min_conf 0): mAP needs the top-K, and the pairing needs the detections below conf.
    reference_model = load_model(torch_path, device=device, conf=parity_conf)
    reference = evaluate_detector(reference_model, samples, conf=parity_conf, images=images)
    confident = sum(int((d.scores >= parity_conf).sum()) for d in reference.detections)
    if confident < MIN_PARITY_DETECTIONS:
        logger.warning(
            f"export parity: the torch model has only {confident} detections >= export.parity_conf="
            f"{parity_conf} on {len(samples)} val images, so boxes and scores are barely compared (mAP50 "
            "still is). Lower export.parity_conf or raise export.parity_images for a stronger check."
        )
    report: dict[str, Any] = {
        "images": len(samples),
        "conf": parity_conf,
        "rule": "detections paired one-to-one (same class, IoU >= 0.5) over the unthresholded top-K; "
        "deviations over pairs with a score >= conf on either side; broken if the p99 box or score "
        "deviation, |mAP50 delta| or unmatched / compared exceeds the tolerance, or (segmentation) the "
        "mean mask IoU of the pairs is below it; unmatched = score >= conf + score tolerance in one "
        "model and < conf or absent in the other",
        "torch": reference.summary() | {"detections": confident},
    }
    for name, (path, precision) in deployments.items():
        try:
            model = load_model(path, device=device, precision=precision, conf=parity_conf)
        except Exception as err:
            loud_error(f"{name}: exported {path} but cannot load it: {err}")
            report[name] = {"path": str(path), "error": str(err), "ok": False}
            continue
        result = evaluate_detector(model, samples, conf=parity_conf, images=images)
        tolerance = cfg.export.tolerance[tolerance_group(name)]
        drift = compare_detections(
            reference.detections, result.detections, parity_conf, tolerance.score,
            mask_rles=(reference.mask_rles, result.mask_rles),
        )  # fmt: skip
        delta_map = result.metrics.get("mAP_50", 0.0) - reference.metrics.get("mAP_50", 0.0)
        problems = beyond_tolerance(drift, delta_map, tolerance)
        report[name] = {
            "path": str(path),
            "weights": model.meta.precision,
            "precision": model.runner.precision,
            **drift,
            "mAP_50": result.metrics.get("mAP_50"),
            "mAP_50_delta": delta_map,
            "latency_ms_median": median_latency(model, images[0], int(cfg.export.latency_runs)),
            "tolerance": dict(tolerance),
            "problems": problems,
            "ok": not problems,
        }
        if problems:
            loud_error(
                f"EXPORT PARITY FAILED for {name} ({path}): {'; '.join(problems)} "
                f"(max box dev {drift['max_box_dev_px']:.3f} px, max score dev {drift['max_score_dev']:.4f}, "
                f"unmatched {drift['unmatched']}/{drift['compared']} compared detections). "
                "Do not deploy this artifact without checking it."
            )
    return report


def median_latency(model, image: np.ndarray, runs: int) -> float:
    """Median ms of `runs` single-image calls (resize + inference + postprocessing) after a warm-up: what
    the deployment choice compares (the parity pass alone is too few calls on a shared CPU)."""
    import time

    for _ in range(PARITY_WARMUP):
        model(image)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model(image)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def tolerance_group(deployment: str) -> str:
    """int8 | fp16 (fp16 and bf16: both 16-bit floats) | fp32, from a deployment name (ov_fp32@bf16...)."""
    if "int8" in deployment:
        return "int8"
    return "fp16" if "16" in deployment.split("_", 1)[-1] else "fp32"


def print_report(report: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in report.items() if isinstance(v, dict) and "ok" in v]
    if not rows:
        return
    header = (
        f"{'deployment':<13} {'weights':<7} {'runs in':<7} {'compared':>8} {'box dev p99/max px':>19} "
        f"{'score dev p99/max':>18} {'IoU':>6} {'maskIoU':>7} {'unmatched':>9} {'border':>6} {'mAP50':>6} "
        f"{'delta':>8} {'ms':>7}  status"
    )
    lines = [header]
    for name, r in rows:
        if "error" in r:
            lines.append(f"{name:<13} LOAD ERROR: {r['error']}")
            continue
        lines.append(
            f"{name:<13} {r['weights']:<7} {r['precision']:<7} {r['compared']:>8} "
            f"{r['p99_box_dev_px']:>9.3f}/{r['max_box_dev_px']:<9.3f} "
            f"{r['p99_score_dev']:>8.4f}/{r['max_score_dev']:<9.4f} {r['mean_iou']:>6.4f} "
            f"{r.get('mean_mask_iou', float('nan')):>7.4f} {r['unmatched']:>9} "
            f"{r['borderline']:>6} {r['mAP_50']:>6.3f} {r['mAP_50_delta']:>+8.4f} {r['latency_ms_median']:>7.2f}  "
            f"{'ok' if r['ok'] else 'BEYOND TOLERANCE'}"
        )
    title = (
        f"Export parity vs torch ({report['images']} val images, detections >= {report['conf']} compared):"
    )
    print("\n".join(["", title, *lines, ""]))
