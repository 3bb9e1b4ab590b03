"""Post-training int8 quantization of the OpenVINO IR with NNCF -> output/<exp>/model_int8.xml.

    python -m src.dl.ov_int8 exp_name=my_run                                     # quick
    python -m src.dl.ov_int8 exp_name=my_run ov_int8.mode=accuracy ov_int8.max_drop=0.01

quick: nncf.quantize calibrated on `subset_size` train images (minutes).
accuracy: nncf.quantize_with_accuracy_control: quantize, then return layers to float until `metric`
    (default mAP_50, computed by src/metrics/validator.py on `val_images` val images) drops by at most
    `max_drop` (absolute). Much slower: it re-validates once per layer it tries.
float_decoding: the box-distribution decoding (softmax over the FDR bins and its weighted sum, the
    `integral` module) and the fused postprocessing stay in float (nncf.IgnoredScope). Their inputs are
    probabilities whose weighted sum is a box edge: int8 rounding there moves boxes directly.
    Measured on the demo model (D-FINE-n, 256 px, fp32 mAP50 0.2015, 24 val images, quick mode): with it
    mAP50 0.1841 and box drift from fp32 1.35 px mean, without it 0.1833 and 1.35 px, same latency: the
    int8 error comes from the backbone and encoder. It stays on by default: it costs nothing and protects
    the one place where a rounding error is directly a box-edge error.
Prints and saves (ov_int8_report.json) a before/after table: latency and mAP of fp32 vs int8 (and for a
segmentation model the mean mask IoU of int8's detections against fp32's: the mask branch is quantized
too; its 4th output, the mask logits, is gathered in the float postprocessing).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.errors import UserError
from src.common.experiment import Experiment, stage_config
from src.common.io import atomic_write_json
from src.common.network_input import preprocess_images
from src.dl.artifacts import ensure_fresh
from src.dl.split_samples import load_split_samples
from src.runtime import load_model
from src.runtime.detector import Detector
from src.runtime.evaluate import LabelledImage, evaluate_detector
from src.runtime.meta import INPUT_NAMES, ModelMeta, read_openvino_meta, write_openvino_meta

# What `float_decoding` keeps in float, as regexes on OpenVINO op names (they keep the torch module path of
# the legacy ONNX export): the decoder's own top-level ops, i.e. the FDR integral (softmax over the bins and
# its product with W(n)) and the box arithmetic around it, not its Linear/attention sub-modules; and every op
# of the fused postprocessing.
FLOAT_DECODING_PATTERNS = (r"/model/decoder/[A-Za-z]+(_\d+)?", r"/postprocessor/.*")


def float_decoding_scope(ov_model):
    """nncf.IgnoredScope with the FDR integral and postprocessing ops of this model (None if none found)."""
    import nncf

    names = [op.get_friendly_name() for op in ov_model.get_ops()]
    matched = [n for n in names if any(re.fullmatch(p, n) for p in FLOAT_DECODING_PATTERNS)]
    if not matched:
        logger.warning("float_decoding: no integral/postprocessor ops found by name; quantizing everything")
        return None
    logger.info(f"float_decoding: {len(matched)} ops kept in float (FDR integral + postprocessing)")
    return nncf.IgnoredScope(names=matched, validate=False)


class ImageCache:
    """Decoded RGB images of a few samples, kept in memory (NNCF iterates several times over them)."""

    def __init__(self, samples: list[LabelledImage]):
        self.samples = samples
        self.images = [s.read_image() for s in samples]


def make_transform(meta: ModelMeta):
    """NNCF data item (an RGB image) -> the IR's input dict (same preprocessing as every backend)."""
    h, w = meta.img_size
    copies = meta.batch_size or 1  # a fixed-batch IR gets the image repeated to its batch

    def transform(image_rgb: np.ndarray) -> dict[str, np.ndarray]:
        batch, _ = preprocess_images([image_rgb], meta.img_size, meta.keep_ratio)
        sizes = np.array([[w, h]], np.float32)
        return {INPUT_NAMES[0]: np.repeat(batch, copies, 0), INPUT_NAMES[1]: np.repeat(sizes, copies, 0)}

    return transform


def make_validation_fn(meta: ModelMeta, cache: ImageCache, metric: str):
    """validation_fn(compiled_model, items) -> (metric value, None) over the cached val images."""
    from src.runtime.openvino_model import OpenVinoRunner

    def validate(compiled_model, _items) -> tuple[float, None]:
        detector = Detector(OpenVinoRunner.from_compiled(compiled_model, meta))
        value = float(
            evaluate_detector(detector, cache.samples, images=cache.images, desc="validate").metrics[metric]
        )
        logger.info(f"  {metric} = {value:.4f}")
        return value, None

    return validate


def quantize(ov_model, cfg: DictConfig, meta: ModelMeta, calibration: ImageCache, validation: ImageCache):
    import nncf

    nncf.set_log_level(logging.WARNING)  # its INFO lists every op it does not quantize

    options = cfg.ov_int8
    transform = make_transform(meta)
    calibration_data = nncf.Dataset(calibration.images, transform)
    scope = float_decoding_scope(ov_model) if options.float_decoding else None
    common = {
        # mixed: asymmetric activations (post-softmax/ReLU ranges); performance: symmetric, fastest kernels
        "preset": {
            "mixed": nncf.QuantizationPreset.MIXED,
            "performance": nncf.QuantizationPreset.PERFORMANCE,
        }[str(options.preset)],
        "subset_size": min(int(options.subset_size), len(calibration.images)),
        "ignored_scope": scope,
        "fast_bias_correction": bool(options.fast_bias_correction),
        # transformer: smooth-quant friendly handling of the decoder's MatMuls (some ops stay float)
        "model_type": nncf.ModelType.TRANSFORMER if options.transformer else None,
    }
    if options.mode == "quick":
        return nncf.quantize(ov_model, calibration_data, **common)
    if options.mode == "accuracy":
        if not validation.samples:
            raise ValueError("ov_int8.mode=accuracy needs val images (run src.etl.split)")
        validation_data = nncf.Dataset(validation.images, transform)
        return nncf.quantize_with_accuracy_control(
            ov_model,
            calibration_data,
            validation_data,
            make_validation_fn(meta, validation, str(options.metric)),
            max_drop=float(options.max_drop),
            drop_type=nncf.DropType.ABSOLUTE,
            **common,
        )
    raise ValueError(f"ov_int8.mode must be quick or accuracy, got {options.mode!r}")


def save_int8(quantized, meta: ModelMeta, path: Path, extra: dict[str, Any]) -> Path:
    """Write the quantized IR (the xml/bin pair replaced as a pair) with int8 metadata."""
    from src.runtime.openvino_model import save_ir

    int8_meta = copy.deepcopy(meta)
    int8_meta.precision = "int8"
    int8_meta.extra = {**int8_meta.extra, **extra}
    write_openvino_meta(quantized, int8_meta)
    return save_ir(quantized, path, compress_to_fp16=False)


def measure(
    path: Path,
    precision: str,
    validation: ImageCache,
    label: str,
    reference=None,
    score_margin: float = 0.0,
) -> tuple[dict, Any]:
    """Latency + metrics of one IR on the val images; with `reference` (fp32's EvalResult) also the drift
    of its detections (above the model's threshold) from fp32's; a detection within `score_margin` of the
    threshold in one model and below it in the other is borderline, not unmatched."""
    from src.dl.parity import compare_detections

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
        f"{'box drift px (mean / max)':>26}" + (f" {'mask IoU (mean / min)':>22}" if masks else "")
    )
    lines = [header]
    for r in rows:
        drift = f"{r['mean_box_drift_px']:.2f} / {r['box_drift_px']:.2f}" if "box_drift_px" in r else "-"
        mask = f"{r['mean_mask_iou']:.3f} / {r['min_mask_iou']:.3f}" if "mean_mask_iou" in r else "-"
        lines.append(
            f"{r['model']:<6} {r['latency_ms_median']:>20.2f} {r['latency_ms_p90']:>8.2f} "
            f"{r['mAP_50']:>7.4f} {r['mAP_50_95']:>9.4f} {r['f1']:>6.3f} {drift:>26}"
            + (f" {mask:>22}" if masks else "")
        )
    note = "drift: int8 detections vs fp32's, above the model's thresholds"
    print("\n".join(["", f"OpenVINO fp32 vs int8 on {images} val images (CPU, batch 1):", *lines, note, ""]))


def make_int8(cfg: DictConfig, experiment: Experiment) -> tuple[Path, dict[str, Any], ImageCache]:
    """Quantize the experiment's model_fp32.xml -> model_int8.xml (recorded in the manifest).
    Returns the int8 path, the report so far and the val images decoded for measuring it."""
    from src.runtime.openvino_model import shared_core

    options = cfg.ov_int8
    fp32_path = experiment.artifact("ov_fp32")
    if not fp32_path.exists():
        raise UserError(f"{fp32_path} not found: run `python -m src.dl.export exp_name={cfg.exp_name}` first")
    ensure_fresh(fp32_path)  # int8 from a stale fp32 IR would be stale too
    made_from = experiment.manifest().get("made_into", {}).get("ov_fp32", {}).get("checkpoint_sha256")
    ov_model = shared_core().read_model(str(fp32_path))  # one Core per process (see shared_core)
    meta = read_openvino_meta(ov_model, fp32_path)

    calibration_samples = load_split_samples(cfg, "train", limit=int(options.subset_size))
    if not calibration_samples:
        calibration_samples = load_split_samples(cfg, "val", limit=int(options.subset_size))
    if not calibration_samples:
        raise UserError(f"no train/val images for calibration in {cfg.splits_dir}: run src.etl.split")
    logger.info(f"ov_int8 ({options.mode}): decoding {len(calibration_samples)} calibration images")
    calibration = ImageCache(calibration_samples)
    validation = ImageCache(load_split_samples(cfg, "val", limit=int(options.val_images)))

    started = time.perf_counter()
    quantized = quantize(ov_model, cfg, meta, calibration, validation)
    int8_path = save_int8(
        quantized, meta, experiment.artifact("ov_int8"),
        {"int8_mode": str(options.mode), "float_decoding": bool(options.float_decoding)},
    )  # fmt: skip
    experiment.record_export("ov_int8", made_from, mode=str(options.mode))
    seconds = time.perf_counter() - started
    logger.info(f"int8 model: {int8_path} ({seconds:.0f} s)")

    report: dict[str, Any] = {"mode": str(options.mode), "float_decoding": bool(options.float_decoding),
                              "calibration_images": len(calibration.images), "quantize_seconds": seconds}  # fmt: skip
    return int8_path, report, validation


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = stage_config(cfg)
    options = cfg.ov_int8
    experiment = Experiment.of(cfg)
    fp32_path = experiment.artifact("ov_fp32")
    int8_path, report, validation = make_int8(cfg, experiment)
    if validation.samples:
        precision = str(options.precision)
        fp32_row, fp32_result = measure(fp32_path, precision, validation, "fp32")
        int8_row, _ = measure(
            int8_path,
            precision,
            validation,
            "int8",
            reference=fp32_result,
            score_margin=float(cfg.export.tolerance.int8.score),
        )
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
