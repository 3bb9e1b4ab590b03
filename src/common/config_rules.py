"""What config.yaml's defaults cannot say about a key: ranges, choices, shapes, null allowed.

The type of every key comes from its default in config.yaml (src/common/config.py checks it); this
table adds the rest. A key without a rule only has to match its default's type, and a number there
must be >= 0 (every number in config.yaml is a count, size, rate or weight): a key that may be
negative or must be >= 1 gets a rule here. Patterns use fnmatch (`train.augs.*`); an exact key wins.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Maps by design: new entries are accepted (on the command line without a `+`). The value names the
# entry in config.yaml that new entries must look like (None: any value, the map's rule checks them).
OPEN_MAPS = {"label_to_name": None, "train.lrs": "n"}
# `model.variant` of configs and checkpoints written before `model.arch` existed -> the arch it means.
LEGACY_VARIANT_ARCH = {"dfine": "dfine", "deim": "deim_dfine"}
# Maps whose command-line override replaces the whole map (Hydra would merge it into config.yaml's).
REPLACED_MAPS = ("label_to_name",)


@dataclass(frozen=True)
class Rule:
    """`allowed` completes "KEY must be ...". typed: `ok` checks the type itself (the default's is not
    imposed, `allowed` says everything); otherwise `allowed` follows the type ("an int" + " >= 1")."""

    allowed: str
    ok: Callable[[Any], bool]
    typed: bool = False
    nullable: bool = False
    kind: str | None = None  # the type when the default cannot say it (a null default): int | float | str


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(low: float, nullable: bool = False, kind: str | None = None) -> Rule:
    return Rule(f">= {low}", lambda v: v >= low, nullable=nullable, kind=kind)


def above(low: float, nullable: bool = False, kind: str | None = None) -> Rule:
    return Rule(f"> {low}", lambda v: v > low, nullable=nullable, kind=kind)


def between(low: float, high: float, nullable: bool = False, kind: str | None = None) -> Rule:
    return Rule(f"in [{low}, {high}]", lambda v: low <= v <= high, nullable=nullable, kind=kind)


def one_of(*choices: str, nullable: bool = False) -> Rule:
    return Rule(f"one of {' | '.join(choices)}", lambda v: v in choices, typed=True, nullable=nullable)


def subset_of(*choices: str) -> Rule:
    return Rule(
        f"a list from {' | '.join(choices)}",
        lambda v: isinstance(v, list) and all(item in choices for item in v),
        typed=True,
    )


def pair(allowed: str, ok_item: Callable[[Any], bool], ordered: bool = True) -> Rule:
    """[low, high] of items passing ok_item (ordered: low <= high)."""

    def ok(value) -> bool:
        if not isinstance(value, list) or len(value) != 2 or not all(ok_item(v) for v in value):
            return False
        return not ordered or value[0] <= value[1]

    return Rule(allowed, ok, typed=True)


def list_of(allowed: str, ok_item: Callable[[Any], bool], non_empty: bool = True) -> Rule:
    def ok(value) -> bool:
        return isinstance(value, list) and (bool(value) or not non_empty) and all(ok_item(v) for v in value)

    return Rule(allowed, ok, typed=True)


def _probability(value) -> bool:
    return _number(value) and 0 <= value <= 1


def _img_size(value) -> bool:
    """An int (square) or [h, w]: positive multiples of 32 (the backbone's largest stride)."""
    sides = [value] if _int(value) else value if isinstance(value, list) and len(value) == 2 else None
    return sides is not None and all(_int(s) and s > 0 and s % 32 == 0 for s in sides)


def _mixup_epochs(value) -> bool:
    if not isinstance(value, list) or len(value) != 2:
        return False
    start, end = value
    return _int(start) and start >= 0 and (end is None or (_int(end) and end > start))


def _label_to_name(value) -> bool:
    """ids 0..N-1 (ints or digit strings: `label_to_name.4=x` makes the key "4"); distinct non-empty names."""
    if not isinstance(value, dict) or not value:
        return False
    try:
        ids = sorted(int(k) for k in value)
    except (TypeError, ValueError):
        return False
    names = [str(v).strip() for v in value.values()]
    return ids == list(range(len(ids))) and all(names) and len(set(names)) == len(names)


def _conf(value) -> bool:
    """A score threshold, or {class_name: threshold}."""
    if isinstance(value, dict):
        return bool(value) and all(_probability(v) for v in value.values())
    return _probability(value)


def _file_size(value) -> bool:
    if _int(value):
        return value > 0
    return (
        isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?\s*[kmgt]?b", value.strip().lower()) is not None
    )


def _device(value) -> bool:
    """torch devices (auto, cpu, cuda, cuda:N) and OpenVINO ones (gpu, GPU.1, npu...)."""
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|(gpu|npu)(\.\d+)?", str(value), flags=re.I) is not None


PROBABILITY = between(0, 1)
FOLDER_OR_NULL = Rule("a folder path", lambda v: isinstance(v, str) and bool(v), typed=True, nullable=True)
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
OV_PRECISIONS = ("f32", "f16", "bf16")
ANY_PRECISION = one_of(*TORCH_PRECISIONS, "f32", "f16", nullable=True)
ARTIFACT_VARIANTS = ("torch", "onnx", "ov_fp32", "ov_fp16", "ov_int8", "trt_fp16", "trt_fp32", "trt_int8")
SPLITS = ("train", "val", "test")

RULES: dict[str, Rule] = {
    # ------------------------------------------------------------ paths, experiment, classes
    "device": Rule("auto | cpu | cuda | cuda:N (OpenVINO: gpu, gpu.N, npu)", _device, typed=True),
    "label_to_name": Rule(
        "a map of ids 0..N-1 (no gaps) to distinct non-empty names", _label_to_name, typed=True
    ),
    # ------------------------------------------------------------ model
    # model.arch and model.name: checked together by src.models.spec (the sizes depend on the arch)
    "model.variant": Rule(
        "dfine or deim (the old name of model.arch)",
        lambda v: v in LEGACY_VARIANT_ARCH,
        nullable=True,
        kind="str",
    ),
    "model.img_size": Rule(
        "[h, w] (or one int for a square) of positive multiples of 32", _img_size, typed=True
    ),
    "model.num_queries": at_least(1, nullable=True, kind="int"),
    "model.task": one_of("detect", "segment"),
    # ------------------------------------------------------------ etl
    "preprocess.jpg_quality": between(1, 100),
    "preprocess.pdf_dpi": at_least(1),
    "preprocess.workers": at_least(1),
    "check.workers": at_least(1),
    "split.train": Rule("> 0 and <= 1", lambda v: 0 < v <= 1),
    "split.val": PROBABILITY,
    "split.test": PROBABILITY,
    "convert.format": one_of("coco2yolo", "voc2yolo", "yolo2coco"),
    "demo_data.num_images": at_least(1),
    "demo_data.min_size": at_least(32),
    "demo_data.max_size": at_least(32),
    "demo_data.object_scale": pair(
        "[min, max] with 0 < min <= max <= 0.9", lambda v: _number(v) and 0 < v <= 0.9
    ),
    "demo_data.clutter": pair("[min, max] ints >= 0", lambda v: _int(v) and v >= 0),
    "check.near_duplicate_distance": between(0, 64),
    "check.near_duplicate_similarity": between(-1, 1),
    "check.near_duplicate_detail": between(-1, 1),
    "check.small_object_px": at_least(0, kind="float"),
    "check.small_object_share": PROBABILITY,
    "tile.size": Rule(
        "[h, w] (or one int for a square) of positive multiples of 32", _img_size, typed=True, nullable=True
    ),
    "tile.overlap": Rule("in [0, 1)", lambda v: 0 <= v < 1),
    "tile.min_visible": PROBABILITY,
    "tile.background_rate": PROBABILITY,
    "tile.jpg_quality": between(1, 100),
    "tile.workers": at_least(1),
    "slicing.enabled": Rule("auto | true | false", lambda v: v in ("auto", True, False), typed=True),
    "slicing.overlap": Rule("in [0, 1)", lambda v: 0 <= v < 1),
    "slicing.match_metric": one_of("ios", "iou"),
    "slicing.match_threshold": PROBABILITY,
    "slicing.merge": one_of("nmm", "nms"),
    "slicing.grow_min_score": between(0, 1, nullable=True, kind="float"),
    # ------------------------------------------------------------ train
    "train.epochs": at_least(1),
    "train.batch_size": at_least(1),
    "train.accumulation_steps": at_least(1),
    "train.betas": pair("[beta1, beta2] in [0, 1)", lambda v: _number(v) and 0 <= v < 1, ordered=False),
    "train.scheduler": one_of("onecycle", "flat_cosine"),
    "train.warmup_pct": PROBABILITY,
    "train.flat_cosine.min_lr_ratio": PROBABILITY,
    "train.ema_decay": PROBABILITY,
    "train.amp": one_of("auto", "off", "bf16", "fp16"),
    "train.threads": at_least(1, nullable=True, kind="int"),
    "train.cache": one_of("off", "ram", "disk"),
    "train.decision_metrics": list_of(
        "a non-empty list of metric names", lambda v: isinstance(v, str) and bool(v)
    ),
    "train.max_bad_steps": at_least(1),
    "train.eval_every": at_least(1),
    "train.checkpoint_every_minutes": at_least(0, kind="float"),  # an int default; 0.5 is fine
    "train.max_steps_per_epoch": at_least(1, nullable=True, kind="int"),
    "train.abort_after_steps": at_least(1, nullable=True, kind="int"),
    "train.conf_thresh": PROBABILITY,
    "train.iou_thresh": PROBABILITY,
    "train.mosaic.prob": PROBABILITY,
    "train.mosaic.scale": pair("[min, max] zoom with 0 < min <= max", lambda v: _number(v) and v > 0),
    "train.mosaic.degrees": between(0, 180),
    "train.mosaic.translate": PROBABILITY,
    "train.mosaic.min_box_px": at_least(0, kind="float"),
    "train.mosaic.min_area_ratio": PROBABILITY,
    "train.multiscale_prob": PROBABILITY,
    "train.mixup.prob": PROBABILITY,
    "train.mixup.epochs": Rule(
        "[start, end] epochs (ints, start >= 0, end > start or null)", _mixup_epochs, typed=True
    ),
    "train.augs.*": PROBABILITY,
    "train.augs.rotation_degree": between(0, 180, kind="float"),
    "train.cls_loss": one_of("auto", "vfl", "mal"),
    "train.dn_negatives.iou_thresh": PROBABILITY,
    "train.mask_loss.points": at_least(1),
    "train.mask_loss.oversample_ratio": at_least(1, kind="float"),
    "train.mask_loss.importance_sample_ratio": PROBABILITY,
    "train.mask_loss.matcher_cost": at_least(0, kind="float"),
    "train.flat_cosine.flat_epochs": at_least(0, nullable=True, kind="int"),
    "train.fppi_tolerance": at_least(0, nullable=True, kind="float"),
    "train.negatives_path": FOLDER_OR_NULL,
    "train.negatives_max_images": at_least(1, nullable=True, kind="int"),
    "train.negatives_thresholds": list_of("a non-empty list of scores in [0, 1]", _probability),
    # ------------------------------------------------------------ deployment
    "export.formats": subset_of("onnx", "openvino", "tensorrt"),
    "export.opset": at_least(17),
    "export.max_batch_size": at_least(1),
    "export.max_detections": at_least(1),
    "export.trt_workspace_gb": above(0, kind="float"),
    "export.precision": one_of("auto", "fp32", "bf16", "f16", "int8"),
    "export.precision_rule.map50_drop": PROBABILITY,
    "export.precision_rule.box_iou_median": PROBABILITY,
    "export.precision_rule.box_iou_p5": PROBABILITY,
    "export.precision_rule.score_dev_p95": PROBABILITY,
    "export.precision_rule.unmatched_frac": PROBABILITY,
    "export.precision_rule.confidence": PROBABILITY,
    "export.parity_images": at_least(1),
    "export.latency_runs": at_least(1),
    "export.parity_conf": PROBABILITY,
    "export.tolerance.*.score": PROBABILITY,
    "export.tolerance.*.map50": PROBABILITY,
    "export.tolerance.*.unmatched_frac": PROBABILITY,
    "bench.split": one_of("auto", "test", "val"),
    "bench.images": at_least(1, nullable=True, kind="int"),
    "bench.backends": subset_of(*ARTIFACT_VARIANTS),
    "bench.torch_precision": one_of(*TORCH_PRECISIONS),
    "infer.precision": ANY_PRECISION,
    "infer.conf": Rule("a score in [0, 1] or {class_name: score}", _conf, nullable=True, typed=True),
    "infer.tracker.low_conf": PROBABILITY,
    "infer.tracker.match_iou": PROBABILITY,
    "infer.tracker.low_match_iou": PROBABILITY,
    "infer.tracker.confirm_frames": at_least(1),
    "check_errors.splits": subset_of(*SPLITS),
    "check_errors.precision": ANY_PRECISION,
    "check_errors.conf": Rule("a score in [0, 1] or {class_name: score}", _conf, nullable=True, typed=True),
    "check_errors.iou_thresh": PROBABILITY,
    "check_errors.max_images": at_least(1, nullable=True, kind="int"),
    "test_batching.precision": ANY_PRECISION,
    "test_batching.batch_sizes": list_of("a non-empty list of ints >= 1", lambda v: _int(v) and v >= 1),
    "test_batching.runs": at_least(1),
    "ov_int8.mode": one_of("quick", "accuracy"),
    "ov_int8.preset": one_of("mixed", "performance"),
    "ov_int8.subset_size": at_least(1),
    "ov_int8.val_images": at_least(1),
    "ov_int8.max_drop": PROBABILITY,
    "ov_int8.precision": one_of(*OV_PRECISIONS),
    "demo_ui.port": between(1, 65535, nullable=True, kind="int"),
    "demo_ui.precision": ANY_PRECISION,
    "demo_ui.examples": FOLDER_OR_NULL,
    "demo_ui.max_file_size": Rule(
        'a size such as "100mb", "1gb", or bytes (int >= 1)', _file_size, typed=True
    ),
    "demo_ui.max_images": at_least(1),
    "demo_ui.max_video_frames": at_least(1, nullable=True),
    "demo_ui.max_video_seconds": above(0, nullable=True, kind="float"),
    "demo_ui.concurrency": at_least(1),
    "demo_ui.queue_size": at_least(1),
    "demo_ui.keep_results": at_least(1),
}

NON_NEGATIVE = at_least(0)


def rule_for(key: str) -> Rule | None:
    """The rule of a dotted key: the exact entry, else the first pattern that matches."""
    if key in RULES:
        return RULES[key]
    return next(
        (rule for pattern, rule in RULES.items() if "*" in pattern and fnmatch.fnmatchcase(key, pattern)),
        None,
    )
