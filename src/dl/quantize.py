"""Post-training int8 quantization of an experiment's OpenVINO IR with NNCF: model_fp32.xml -> model_int8.xml.

The library behind `src.dl.ov_int8` (the stage that also measures the result) and `src.dl.export`
(`export.int8`: int8 competes in the deployment choice). Stages build `Int8Settings` from `ov_int8.*` and
hand over the images; nothing here reads the config.

- mode quick: `nncf.quantize` calibrated on `subset_size` images.
- mode accuracy: `nncf.quantize_with_accuracy_control`: quantize, then return layers to float until the
  metric on the validation images drops by at most `max_drop` (absolute). The metric is a validator metric
  (mAP_50, ...) or `box_iou`: over the fp32 IR's confident detections, the mean IoU of their int8
  counterpart, 0 where int8 lost them (src/dl/parity.py `kept_box_iou`); it needs no labels and judges what
  int8 moves most, box edges, without rewarding a model that drops detections.
- float_parts: parts kept in float (nncf.IgnoredScope, by op name; the legacy ONNX export keeps the torch
  module path in each name): `decoding` (the FDR integral, its box arithmetic, the fused postprocessing),
  `box_heads` (the MLPs whose outputs are box distributions), `score_heads` (class logits, LQE).
- transformer: model_type TRANSFORMER (attention MatMuls handled as transformers need, SmoothQuant on
  their inputs with `smooth_quant` alpha; -1 turns SmoothQuant off); preset mixed (asymmetric activations)
  or performance (symmetric); fast_bias_correction (false: the full, slower bias correction).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from src.common.errors import UserError
from src.common.experiment import Experiment
from src.common.network_input import preprocess_images
from src.dl.artifacts import ensure_fresh
from src.dl.parity import kept_box_iou
from src.runtime import load_model
from src.runtime.detector import Detector
from src.runtime.evaluate import LabelledImage, evaluate_detector
from src.runtime.meta import INPUT_NAMES, ModelMeta, read_openvino_meta, write_openvino_meta
from src.runtime.openvino_model import OpenVinoRunner, save_ir, shared_core

# Regexes on OpenVINO op names for each part `float_parts` can keep in float.
FLOAT_PARTS = {
    # the decoder's own top-level ops (the FDR integral: softmax over the bins and its product with W(n),
    # and the box arithmetic around it), not its Linear/attention sub-modules; every postprocessing op
    "decoding": (r"/model/decoder/[A-Za-z]+(_\d+)?(_output_0)?", r"/postprocessor/.*"),
    "box_heads": (r"/model/decoder/(dec_bbox_head\.\d+|pre_bbox_head|enc_bbox_head)/.*",),
    "score_heads": (r"/model/decoder/(dec_score_head\.\d+|enc_score_head|lqe_layers\.\d+)/.*",),
}
BOX_IOU_METRIC = "box_iou"


@dataclass(frozen=True)
class Int8Settings:
    """What nncf.quantize is asked for (the ov_int8.* keys of the same names)."""

    mode: str = "quick"  # quick | accuracy
    subset_size: int = 300
    preset: str = "mixed"  # mixed | performance
    transformer: bool = True
    smooth_quant: float = 0.95  # SmoothQuant alpha of MatMuls (transformer only); -1: off
    fast_bias_correction: bool = True
    float_parts: tuple[str, ...] = ("decoding",)
    metric: str = "mAP_50"  # accuracy mode: a validator metric or box_iou
    max_drop: float = 0.01
    conf: float = 0.3  # box_iou: detections paired above this score

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **overrides) -> Int8Settings:
        """From the ov_int8 config section (keys it does not name are left out)."""
        names = {f.name for f in fields(cls)}
        values = {k: options[k] for k in names if k in options} | overrides
        values["float_parts"] = tuple(str(p) for p in values.get("float_parts", ()))
        unknown = sorted(set(values["float_parts"]) - set(FLOAT_PARTS))
        if unknown:
            raise UserError(f"ov_int8.float_parts: unknown {unknown}; choose from {sorted(FLOAT_PARTS)}")
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"float_parts": list(self.float_parts)}


@dataclass
class ImageSet:
    """Samples and their decoded RGB images, kept in memory (NNCF iterates several times over them)."""

    samples: list[LabelledImage]
    images: list[np.ndarray]

    @classmethod
    def of(cls, samples: Sequence[LabelledImage]) -> ImageSet:
        return cls(list(samples), [s.read_image() for s in samples])


def float_scope(ov_model, parts: Sequence[str]):
    """nncf.IgnoredScope with the ops of `parts` (FLOAT_PARTS keys) in this model; None when none match."""
    import nncf

    patterns = [p for part in parts for p in FLOAT_PARTS[part]]
    if not patterns:
        return None
    names = [op.get_friendly_name() for op in ov_model.get_ops()]
    matched = [n for n in names if any(re.fullmatch(p, n) for p in patterns)]
    if not matched:
        logger.warning(f"float parts {list(parts)}: no op names match; quantizing everything")
        return None
    logger.info(f"float parts {list(parts)}: {len(matched)} ops kept in float")
    return nncf.IgnoredScope(names=matched, validate=False)


def make_transform(meta: ModelMeta) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """NNCF data item (an RGB image) -> the IR's input dict (same preprocessing as every backend)."""
    h, w = meta.img_size
    copies = meta.batch_size or 1  # a fixed-batch IR gets the image repeated to its batch

    def transform(image_rgb: np.ndarray) -> dict[str, np.ndarray]:
        batch, _ = preprocess_images([image_rgb], meta.img_size, meta.keep_ratio)
        sizes = np.array([[w, h]], np.float32)
        return {INPUT_NAMES[0]: np.repeat(batch, copies, 0), INPUT_NAMES[1]: np.repeat(sizes, copies, 0)}

    return transform


def make_validation_fn(meta: ModelMeta, validation: ImageSet, metric: str, reference=None, conf: float = 0.3):
    """validation_fn(compiled_model, items) -> (metric value, None) over the validation images. box_iou:
    kept_box_iou against `reference` (fp32's EvalResult on the same images)."""

    def validate(compiled_model, _items) -> tuple[float, None]:
        detector = Detector(OpenVinoRunner.from_compiled(compiled_model, meta))
        result = evaluate_detector(
            detector, validation.samples, conf=conf, images=validation.images, desc="validate"
        )
        if metric == BOX_IOU_METRIC:
            value = kept_box_iou(reference.detections, result.detections, conf)
        else:
            value = float(result.metrics[metric])
        logger.info(f"  {metric} = {value:.4f}")
        return float(value), None

    return validate


def nncf_options(ov_model, settings: Int8Settings, calibration_size: int) -> tuple[dict[str, Any], Any]:
    """The keyword arguments nncf.quantize and quantize_with_accuracy_control share, and the advanced
    quantization parameters (each function names that argument its own way)."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(settings.smooth_quant))
    )
    return {
        "preset": presets[settings.preset],
        "subset_size": min(int(settings.subset_size), calibration_size),
        "ignored_scope": float_scope(ov_model, settings.float_parts),
        "fast_bias_correction": bool(settings.fast_bias_correction),
        "model_type": nncf.ModelType.TRANSFORMER if settings.transformer else None,
    }, advanced


def quantize_model(
    ov_model, meta: ModelMeta, settings: Int8Settings, calibration: ImageSet, validation: ImageSet | None,
    reference_path: Path | None = None,
):  # fmt: skip
    """The quantized ov.Model. Accuracy mode needs `validation`; box_iou also the fp32 IR (`reference_path`)
    whose detections the int8 ones are paired with."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # its INFO lists every op it does not quantize
    transform = make_transform(meta)
    calibration_data = nncf.Dataset(calibration.images, transform)
    options, advanced = nncf_options(ov_model, settings, len(calibration.images))
    if settings.mode == "quick":
        return nncf.quantize(ov_model, calibration_data, advanced_parameters=advanced, **options)
    if settings.mode != "accuracy":
        raise UserError(f"ov_int8.mode must be quick or accuracy, got {settings.mode!r}")
    if validation is None or not validation.samples:
        raise UserError("ov_int8.mode=accuracy needs val images (run src.etl.split)")
    reference = None
    if settings.metric == BOX_IOU_METRIC:

        fp32 = load_model(reference_path, device="cpu", precision="f32")
        reference = evaluate_detector(
            fp32, validation.samples, conf=settings.conf, images=validation.images, desc="fp32 reference"
        )
    return nncf.quantize_with_accuracy_control(
        ov_model,
        calibration_data,
        nncf.Dataset(validation.images, transform),
        make_validation_fn(meta, validation, settings.metric, reference, settings.conf),
        max_drop=float(settings.max_drop),
        drop_type=nncf.DropType.ABSOLUTE,
        advanced_quantization_parameters=advanced,
        **options,
    )


def save_int8(quantized, meta: ModelMeta, path: Path, extra: dict[str, Any]) -> Path:
    """Write the quantized IR (the xml/bin pair replaced as a pair) with int8 metadata."""

    int8_meta = copy.deepcopy(meta)
    int8_meta.precision = "int8"
    int8_meta.extra = {**int8_meta.extra, **extra}
    write_openvino_meta(quantized, int8_meta)
    return save_ir(quantized, path, compress_to_fp16=False)


def quantize_ir(
    fp32_path: Path, int8_path: Path, settings: Int8Settings, calibration: ImageSet,
    validation: ImageSet | None = None,
) -> tuple[Path, float]:  # fmt: skip
    """fp32 IR file -> int8 IR file (any paths: the benchmarks compare settings side by side).
    Returns the int8 path and the seconds quantization took."""

    if not calibration.images:
        raise UserError("no images to calibrate int8 on: run src.etl.split")
    ov_model = shared_core().read_model(str(fp32_path))  # one Core per process (see shared_core)
    meta = read_openvino_meta(ov_model, fp32_path)
    started = time.perf_counter()
    quantized = quantize_model(ov_model, meta, settings, calibration, validation, fp32_path)
    save_int8(quantized, meta, int8_path, {"int8": settings.describe()})
    return int8_path, time.perf_counter() - started


def calibration_sets(
    load_samples: Callable[[str, int | None], list[LabelledImage]], settings: Int8Settings, val_images: int
) -> tuple[ImageSet, ImageSet]:
    """(calibration: train images, else val; validation: `val_images` val images (0: none)), decoded;
    `load_samples(split, limit)` reads a split of the experiment's data."""
    samples = load_samples("train", settings.subset_size) or load_samples("val", settings.subset_size)
    logger.info(f"int8 ({settings.mode}): decoding {len(samples)} calibration images")
    validation = load_samples("val", val_images) if val_images > 0 else []
    return ImageSet.of(samples), ImageSet.of(validation)


def make_int8(
    experiment: Experiment, settings: Int8Settings, calibration: ImageSet, validation: ImageSet | None = None
) -> tuple[Path, dict[str, Any]]:
    """The experiment's model_fp32.xml -> model_int8.xml, recorded in the manifest as made from the same
    checkpoint. Returns the int8 path and a report (settings, images, seconds)."""
    fp32_path = experiment.artifact("ov_fp32")
    if not fp32_path.exists():
        raise UserError(f"{fp32_path} not found: export the experiment first")
    ensure_fresh(fp32_path)  # int8 from a stale fp32 IR would be stale too
    made_from = experiment.manifest().get("made_into", {}).get("ov_fp32", {}).get("checkpoint_sha256")
    int8_path, seconds = quantize_ir(
        fp32_path, experiment.artifact("ov_int8"), settings, calibration, validation
    )
    experiment.record_export("ov_int8", made_from, mode=settings.mode)
    logger.info(f"int8 model: {int8_path} ({seconds:.0f} s)")
    report = settings.describe() | {
        "calibration_images": len(calibration.images),
        "quantize_seconds": seconds,
    }
    return int8_path, report
