"""Export parity: how far each exported artifact's detections drift from the torch model's.

Used by src.dl.export (export_report.json, the deployment choice of src/dl/precision.py) and src.dl.ov_int8
(int8 vs fp32). Two runtimes of one model either agree or not on any image, so the comparison runs on up to
export.parity_images labelled images of every split (train included), in proportion to the splits' sizes.
Detections are paired one-to-one per image (same class, IoU >= 0.5, the validator's matching) over the
unthresholded top-K; the pairs' box IoU and score deviation are summarised by percentiles over all pairs
(a few odd pairs do not move a percentile, a systematic shift moves them all), the mAP50 delta comes with a
paired bootstrap interval over the images (src/dl/paired_map.py), and a count of detections present in
one runtime only is judged against a rate with a binomial test. A segmentation model's pairs are also
compared by mask: mean / min mask IoU (metrics.masks.mask_iou) of the paired detections' masks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from omegaconf import DictConfig
from scipy.stats import binom

from src.dl.paired_map import paired_map50_delta
from src.dl.split_samples import load_split_samples
from src.etl.splits import read_split
from src.metrics.masks import mask_iou
from src.metrics.matching import greedy_match, iou_matrix, score_order
from src.runtime import load_model
from src.runtime.evaluate import LabelledImage, decode_masks, evaluate_detector

LOUD = "!" * 100
PARITY_WARMUP = 2  # untimed runs before the latency each deployment is chosen by
MIN_PARITY_DETECTIONS = 10  # fewer compared detections than this: the box/score check says little
# compared: detections >= conf in either model (a pair counts once); *_detections: >= conf in each model;
# unmatched / borderline: see compare_detections
PARITY_COUNTS = (
    "compared", "pairs", "unmatched", "borderline", "reference_detections", "artifact_detections",
)  # fmt: skip
SPLITS = ("train", "val", "test")


def loud_error(message: str) -> None:
    """An error nobody scrolls past: a result that must not be used silently."""
    logger.error(f"\n{LOUD}\n{message}\n{LOUD}")


# ---------------------------------------------------------------------------------------------------- parity


def pair_detections(reference, candidate, iou_thresh: float) -> np.ndarray:
    """Index of the `candidate` detection paired with each `reference` detection of one image (-1: none).

    One-to-one, same class, IoU >= iou_thresh: the validator's matching (src/metrics/matching.py), reference
    detections visited from the highest score down, each taking the free candidate box it overlaps most.
    """

    iou = iou_matrix(reference.boxes, candidate.boxes)
    same_class = reference.labels[:, None] == candidate.labels[None, :]
    paired, _ = greedy_match(iou, score_order(reference.scores), same_class, iou_thresh)
    return paired


def deviation_stats(values: list[np.ndarray], name: str) -> dict[str, float]:
    """max / p99 / p95 / mean of a deviation over every compared pair (0 when nothing was compared)."""
    flat = np.concatenate([np.zeros(0), *values])
    if not flat.size:
        return {f"max_{name}": 0.0, f"p99_{name}": 0.0, f"p95_{name}": 0.0, f"mean_{name}": 0.0}
    return {
        f"max_{name}": float(flat.max()),
        f"p99_{name}": float(np.percentile(flat, 99)),
        f"p95_{name}": float(np.percentile(flat, 95)),
        f"mean_{name}": float(flat.mean()),
    }


def iou_stats(ious: list[np.ndarray]) -> dict[str, float]:
    """mean / min / median / 5th percentile IoU of the compared pairs (1.0 when nothing was compared: no
    box moved)."""
    flat = np.concatenate([np.ones(0), *ious])
    if not flat.size:
        return dict.fromkeys(("mean_iou", "min_iou", "median_iou", "p5_iou"), 1.0)
    return {
        "mean_iou": float(flat.mean()),
        "min_iou": float(flat.min()),
        "median_iou": float(np.median(flat)),
        "p5_iou": float(np.percentile(flat, 5)),
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
        counts["pairs"] += len(pairs)
        counts["reference_detections"] += int(ref_kept.sum())
        counts["artifact_detections"] += int(cand_kept.sum())
    drift = {
        **deviation_stats(box_devs, "box_dev_px"),
        **deviation_stats(score_devs, "score_dev"),
        **iou_stats(ious),
    }
    if mask_ious:  # both sides segment: the same pairs by mask (1.0 when nothing was compared)
        paired_mask_iou = np.concatenate(mask_ious)
        drift["mean_mask_iou"] = float(paired_mask_iou.mean()) if paired_mask_iou.size else 1.0
        drift["min_mask_iou"] = float(paired_mask_iou.min(initial=1.0))
    return drift | counts


def kept_box_iou(reference, candidate, conf: float, iou_thresh: float = 0.5) -> float:
    """Mean, over `reference`'s detections scoring >= conf, of the IoU of their `candidate` counterpart,
    0 where the candidate has none scoring >= conf (lists of Detections of the same images; 1.0 when the
    reference has nothing confident). Unlike the pairs' mean IoU, a lost detection counts."""
    ious = []
    for ref, cand in zip(reference, candidate, strict=True):
        partner = pair_detections(ref, cand, iou_thresh)  # (R,) index into cand, -1: none
        confident = np.flatnonzero(ref.scores >= conf)
        found = confident[(partner[confident] >= 0)]
        found = found[cand.scores[partner[found]] >= conf]
        iou = np.zeros(len(confident))
        iou[np.searchsorted(confident, found)] = pair_iou(ref.boxes[found], cand.boxes[partner[found]])
        ious.append(iou)
    flat = np.concatenate([np.zeros(0), *ious])
    return float(flat.mean()) if flat.size else 1.0


def paired_masks(dets, rles: list[dict] | None, index: np.ndarray) -> np.ndarray | None:
    """(n, H, W) bool masks of detections `index` of one image (None: a detection model)."""
    if rles is not None:

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


def significant_drop(paired: dict[str, float], limit: float) -> bool:
    """Whether mAP50 dropped by more than `limit` AND the paired bootstrap interval of the delta lies below
    0 (the drop is systematic, not one image's flips)."""
    return -paired["mAP_50_delta"] > limit and paired["mAP_50_delta_high"] < 0


def too_many_unmatched(unmatched: int, compared: int, rate: float, confidence: float) -> bool:
    """Whether `unmatched` of `compared` detections is more than a true rate of `rate` explains (one-sided
    binomial test at 1 - confidence): 1 of 18 is not evidence against 2%, 30 of 600 is."""

    if unmatched <= rate * compared:
        return False
    return bool(binom.sf(unmatched - 1, max(compared, 1), rate) < 1 - confidence)


def beyond_tolerance(
    drift: dict[str, float], paired: dict[str, float], tolerance, confidence: float = 0.95
) -> list[str]:
    """What makes an artifact broken (empty: it is faithful). Box and score drift are judged on their 99th
    percentile over the compared pairs (the max is reported too): one odd pair among hundreds is noise, a
    broken artifact moves them all. The mAP50 delta (`paired`: paired_map50_delta) and the unmatched count
    must exceed their tolerances beyond sampling error. A segmentation model's paired masks must overlap by
    tolerance.mask_iou on average."""
    checks = [
        ("p99 box dev", drift["p99_box_dev_px"], tolerance.box_px, "px"),
        ("p99 score dev", drift["p99_score_dev"], tolerance.score, ""),
    ]
    problems = [
        f"{name} {value:.4g}{unit} > {limit}{unit}" for name, value, limit, unit in checks if value > limit
    ]
    if significant_drop(paired, float(tolerance.map50)):
        problems.append(
            f"mAP50 delta {paired['mAP_50_delta']:+.4f} beyond -{tolerance.map50} (interval "
            f"[{paired['mAP_50_delta_low']:+.4f}, {paired['mAP_50_delta_high']:+.4f}])"
        )
    unmatched, compared = int(drift["unmatched"]), int(drift["compared"])
    if too_many_unmatched(unmatched, compared, float(tolerance.unmatched_frac), confidence):
        problems.append(
            f"unmatched fraction {unmatched / max(1, compared):.4g} > {tolerance.unmatched_frac} "
            f"({unmatched} of {compared})"
        )
    if "mean_mask_iou" in drift and drift["mean_mask_iou"] < tolerance.mask_iou:
        problems.append(f"mean mask IoU {drift['mean_mask_iou']:.4g} < {tolerance.mask_iou}")
    return problems


def proportional_counts(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """How many of each split's images a sample of `limit` takes: every split in proportion to its size
    (largest remainders), at least one from each non-empty split while the limit allows."""
    total = sum(sizes.values())
    if total <= limit:
        return dict(sizes)
    counts = {split: min(1, size) for split, size in sizes.items()}
    spare = limit - sum(counts.values())
    exact = {split: spare * (size - counts[split]) / max(1, total - sum(counts.values()))
             for split, size in sizes.items()}  # fmt: skip
    for split in exact:
        counts[split] += int(exact[split])
    remainder = limit - sum(counts.values())
    for split in sorted(exact, key=lambda k: int(exact[k]) - exact[k])[: max(0, remainder)]:
        counts[split] += 1
    return counts


def parity_samples(cfg: DictConfig, limit: int) -> tuple[list[LabelledImage], dict[str, int]]:
    """Up to `limit` labelled images of every split (each split's first ones, in proportion to its size)
    and how many came from each split."""

    sizes = {split: len(read_split(cfg, split) or []) for split in SPLITS}
    counts = proportional_counts(sizes, limit)
    samples = [s for split, n in counts.items() if n for s in load_split_samples(cfg, split, limit=n)]
    return samples, {split: n for split, n in counts.items() if n}


RULE_TEXT = (
    "detections paired one-to-one (same class, IoU >= 0.5) over the unthresholded top-K; pairs with a score "
    ">= conf on either side compared: box IoU and score deviation percentiles over all pairs; the mAP50 "
    "delta with a paired bootstrap interval over images; unmatched = score >= conf + score tolerance in one "
    "model and < conf or absent in the other. Broken (export.tolerance) if the p99 box or score deviation "
    "exceeds the tolerance, mAP50 drops beyond it with an interval below 0, unmatched / compared exceeds it "
    "beyond a binomial test, or (segmentation) the pairs' mean mask IoU is below it"
)


def parity_report(
    cfg: DictConfig, deployments: dict[str, tuple[Path, str | None]], torch_path: Path, device: str
) -> dict[str, Any]:
    """Run every deployment (name -> (file, runtime precision)) and the torch model on the parity images:
    drift, paired box IoU, mAP50 delta with its interval and latency (median of single-image calls, the
    deployments taking turns) per deployment."""
    samples, per_split = parity_samples(cfg, int(cfg.export.parity_images))
    if not samples:
        reason = f"no split images in {cfg.splits_dir} (data_path={cfg.data_path}): export parity NOT checked"
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
            f"{parity_conf} on {len(samples)} images, so boxes and scores are barely compared (mAP50 still "
            "is). Lower export.parity_conf or raise export.parity_images for a stronger check."
        )
    report: dict[str, Any] = {
        "images": len(samples), "images_per_split": per_split, "conf": parity_conf, "rule": RULE_TEXT,
        "torch": reference.summary() | {"detections": confident},
    }  # fmt: skip
    models = {}
    for name, (path, precision) in deployments.items():
        report[name], model = measure_deployment(cfg, name, path, precision, reference, images, device)
        if model is not None:
            models[name] = model
    for name, ms in interleaved_latency(models, images[0], int(cfg.export.latency_runs)).items():
        report[name]["latency_ms_median"] = ms
    report["load_average"] = list(os.getloadavg())
    return report


def measure_deployment(
    cfg: DictConfig, name: str, path: Path, precision: str | None, reference, images: list[np.ndarray],
    device: str,
) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """(parity entry of one deployment against torch's EvalResult `reference`, the loaded model or None)."""
    parity_conf = float(cfg.export.parity_conf)
    try:
        model = load_model(path, device=device, precision=precision, conf=parity_conf)
    except Exception as err:
        loud_error(f"{name}: exported {path} but cannot load it: {err}")
        return {"path": str(path), "error": str(err), "ok": False}, None
    result = evaluate_detector(model, reference.samples, conf=parity_conf, images=images)
    tolerance = cfg.export.tolerance[tolerance_group(name)]
    confidence = float(cfg.export.precision_rule.confidence)
    drift = compare_detections(
        reference.detections, result.detections, parity_conf, tolerance.score,
        mask_rles=(reference.mask_rles, result.mask_rles),
    )  # fmt: skip
    paired = paired_map50_delta(
        reference.detections, result.detections, reference.samples, len(model.class_names), confidence
    )
    problems = beyond_tolerance(drift, paired, tolerance, confidence)
    if problems:
        loud_error(
            f"EXPORT PARITY FAILED for {name} ({path}): {'; '.join(problems)} "
            f"(max box dev {drift['max_box_dev_px']:.3f} px, max score dev {drift['max_score_dev']:.4f}, "
            f"unmatched {drift['unmatched']}/{drift['compared']} compared detections). "
            "Do not deploy this artifact without checking it."
        )
    entry = {
        "path": str(path), "weights": model.meta.precision, "precision": model.runner.precision, **drift,
        "mAP_50": result.metrics.get("mAP_50"),
        **{k: v for k, v in paired.items() if k.startswith("mAP_50_") or k == "confidence"},
        "tolerance": dict(tolerance), "problems": problems, "ok": not problems,
    }  # fmt: skip
    return entry, model


def interleaved_latency(models: dict[str, Any], image: np.ndarray, runs: int) -> dict[str, float]:
    """Median ms of `runs` single-image calls (resize + inference + postprocessing) of each model after a
    warm-up: what the deployment choice compares. The models take turns, so that a shared machine's load
    slows all alike; each turn starts with one untimed call, which absorbs what the previous model leaves
    behind (its runtime's threads spin-waiting for work for a while after a call, its data in the caches),
    and the order rotates from round to round."""
    names = list(models)
    for name in names:
        for _ in range(PARITY_WARMUP):
            models[name](image)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            models[name](image)
            started = time.perf_counter()
            models[name](image)
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}


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
        f"{'deployment':<13} {'weights':<7} {'runs in':<7} {'pairs':>6} {'box IoU p5/med':>15} "
        f"{'score dev p95/max':>18} {'maskIoU':>7} {'unmatched':>9} {'mAP50':>6} {'delta [interval]':>26} "
        f"{'ms':>7}  status"
    )
    lines = [header]
    for name, r in rows:
        if "error" in r:
            lines.append(f"{name:<13} LOAD ERROR: {r['error']}")
            continue
        interval = f"{r['mAP_50_delta']:+.4f} [{r['mAP_50_delta_low']:+.3f},{r['mAP_50_delta_high']:+.3f}]"
        lines.append(
            f"{name:<13} {r['weights']:<7} {r['precision']:<7} {r['pairs']:>6} "
            f"{r['p5_iou']:>7.4f}/{r['median_iou']:<7.4f} {r['p95_score_dev']:>8.4f}/{r['max_score_dev']:<9.4f} "
            f"{r.get('mean_mask_iou', float('nan')):>7.4f} {r['unmatched']:>9} {r['mAP_50']:>6.3f} "
            f"{interval:>26} {r.get('latency_ms_median', float('nan')):>7.2f}  "
            f"{'ok' if r['ok'] else 'BEYOND TOLERANCE'}"
        )
    per_split = ", ".join(f"{n} {split}" for split, n in report.get("images_per_split", {}).items())
    title = (
        f"Export parity vs torch ({report['images']} images: {per_split}; detections >= {report['conf']} "
        f"compared; load average {report.get('load_average', [float('nan')])[0]:.1f}):"
    )
    print("\n".join(["", title, *lines, ""]))
