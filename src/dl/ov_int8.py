"""Post-training int8 quantization of the OpenVINO IR with NNCF -> output/<exp>/model_int8.xml, measured.

    python -m src.dl.ov_int8 exp_name=my_run                                     # quick
    python -m src.dl.ov_int8 exp_name=my_run ov_int8.mode=accuracy ov_int8.max_drop=0.01
    python -m src.dl.ov_int8 exp_name=my_run ov_int8.mode=accuracy ov_int8.metric=box_iou ov_int8.max_drop=0.02

The quantization itself (modes, the parts kept in float, NNCF's options) is src/dl/quantize.py, which
export also calls. This stage prints and saves (ov_int8_report.json) a before/after table: latency and mAP
of fp32 vs int8, the drift of int8's boxes from fp32's (mean paired IoU, p99 / max pixels), and for a
segmentation model the mean mask IoU of int8's detections against fp32's (the mask branch is quantized too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.experiment import Experiment, stage_config
from src.common.io import atomic_write_json
from src.dl.parity import compare_detections
from src.dl.quantize import ImageSet, Int8Settings, calibration_sets, make_int8
from src.dl.split_samples import load_split_samples
from src.runtime import load_model
from src.runtime.evaluate import evaluate_detector


def int8_inputs(cfg: DictConfig) -> tuple[Int8Settings, ImageSet, ImageSet]:
    """The stage's settings (ov_int8.*; box_iou pairs detections above export.parity_conf) and its
    calibration and validation images."""
    settings = Int8Settings.from_options(cfg.ov_int8, conf=float(cfg.export.parity_conf))
    calibration, validation = calibration_sets(
        lambda split, limit: load_split_samples(cfg, split, limit=limit), settings,
        int(cfg.ov_int8.val_images),
    )  # fmt: skip
    return settings, calibration, validation


def measure(
    path: Path,
    precision: str,
    validation: ImageSet,
    label: str,
    reference=None,
    score_margin: float = 0.0,
) -> tuple[dict, Any]:
    """Latency + metrics of one IR on the val images; with `reference` (fp32's EvalResult) also the drift
    of its detections (above the model's threshold) from fp32's; a detection within `score_margin` of the
    threshold in one model and below it in the other is borderline, not unmatched."""

    detector = load_model(path, device="cpu", precision=precision)
    result = evaluate_detector(detector, validation.samples, images=validation.images, warmup=3, desc=label)
    row = {
        "model": label,
        "path": str(path),
        **result.latency_stats(),
        **{k: result.metrics[k] for k in ("mAP_50", "mAP_50_95", "f1")},
    }
    if reference is not None:
        thresholds = detector.thresholds()
        # Unthresholded lists, so a detection whose score crosses the threshold still finds its partner.
        drift = compare_detections(
            reference.detections, result.detections, thresholds, margin=score_margin,
            mask_rles=(reference.mask_rles, result.mask_rles),
        )  # fmt: skip
        row |= {
            "mean_box_iou": drift["mean_iou"],
            "box_drift_px": drift["max_box_dev_px"],
            "p99_box_drift_px": drift["p99_box_dev_px"],
            "mean_box_drift_px": drift["mean_box_dev_px"],
            "score_drift": drift["max_score_dev"],
            "unmatched": drift["unmatched"],
            "compared": drift["reference_detections"],
        }
        if "mean_mask_iou" in drift:  # segmentation model: int8 masks vs fp32's on the same pairs
            row |= {"mean_mask_iou": drift["mean_mask_iou"], "min_mask_iou": drift["min_mask_iou"]}
    return row, result


def print_table(rows: list[dict[str, Any]], images: int) -> None:
    masks = any("mean_mask_iou" in r for r in rows)
    header = (
        f"{'model':<6} {'latency ms (median)':>20} {'p90':>8} {'mAP50':>7} {'mAP50-95':>9} {'F1':>6} "
        f"{'box IoU':>8} {'box drift px (mean / max)':>26}"
        + (f" {'mask IoU (mean / min)':>22}" if masks else "")
    )
    lines = [header]
    for r in rows:
        iou = f"{r['mean_box_iou']:.4f}" if "mean_box_iou" in r else "-"
        drift = f"{r['mean_box_drift_px']:.2f} / {r['box_drift_px']:.2f}" if "box_drift_px" in r else "-"
        mask = f"{r['mean_mask_iou']:.3f} / {r['min_mask_iou']:.3f}" if "mean_mask_iou" in r else "-"
        lines.append(
            f"{r['model']:<6} {r['latency_ms_median']:>20.2f} {r['latency_ms_p90']:>8.2f} "
            f"{r['mAP_50']:>7.4f} {r['mAP_50_95']:>9.4f} {r['f1']:>6.3f} {iou:>8} {drift:>26}"
            + (f" {mask:>22}" if masks else "")
        )
    note = "box IoU / drift: int8 detections paired with fp32's, above the model's thresholds"
    print("\n".join(["", f"OpenVINO fp32 vs int8 on {images} val images (CPU, batch 1):", *lines, note, ""]))


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = stage_config(cfg)
    experiment = Experiment.of(cfg)
    settings, calibration, validation = int8_inputs(cfg)
    int8_path, report = make_int8(experiment, settings, calibration, validation)
    if validation.samples:
        precision = str(cfg.ov_int8.precision)
        fp32_row, fp32_result = measure(experiment.artifact("ov_fp32"), precision, validation, "fp32")
        int8_row, _ = measure(
            int8_path, precision, validation, "int8", reference=fp32_result,
            score_margin=float(cfg.export.tolerance.int8.score),
        )  # fmt: skip
        rows = [fp32_row, int8_row]
        print_table(rows, len(validation.samples))
        report |= {"val_images": len(validation.samples), "results": rows,
                   "mAP_50_drop": rows[0]["mAP_50"] - rows[1]["mAP_50"],
                   "speedup": rows[0]["latency_ms_median"] / rows[1]["latency_ms_median"]}  # fmt: skip
    else:
        logger.warning("no val images: int8 accuracy not measured")
    atomic_write_json(experiment.file("ov_int8_report"), report)
    return report


main = stage_main(run)

if __name__ == "__main__":
    main()
