"""The metadata every model artifact carries, so an exported file runs without any config.

Where it lives: torch checkpoint -> its "meta" dict; ONNX -> metadata_props["dfine_meta"] (JSON);
OpenVINO IR -> rt_info["dfine_meta"] (JSON string); TensorRT engine -> a JSON sidecar `<engine>.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from src.common.config_rules import LEGACY_VARIANT_ARCH
from src.common.io import atomic_write_text

META_KEY = "dfine_meta"
# The thresholds training writes beside a checkpoint (the experiment's FILES["thresholds"]); they take
# precedence over the ones inside the checkpoint.
THRESHOLDS_FILE = "thresholds.json"
META_VERSION = 1
DEFAULT_CONF = 0.5

# The I/O contract of every exported graph (postprocessing fused):
#   images (B, 3, h, w) float32 RGB in [0, 1] + orig_target_sizes (B, 2) float32 (w, h)
#   -> labels (B, K) int64, boxes (B, K, 4) float32 xyxy pixels of orig_target_sizes, scores (B, K) float32
#   [+ a segmentation model (task "segment"): masks (B, K, h/s, w/s) float32 mask logits of the kept
#      queries over the whole network input, s = the mask stride (4 or 8);
#      logit > network_input.MASK_LOGIT_THRESHOLD is the mask]
INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")  # a detection model's outputs
MASK_OUTPUT = "masks"
SEGMENT_OUTPUT_NAMES = (*OUTPUT_NAMES, MASK_OUTPUT)


def output_names(task: str) -> tuple[str, ...]:
    """The graph outputs of a model of `task` (detect | segment), in order."""
    if task not in ("detect", "segment"):
        raise ValueError(f"unknown model task {task!r}: detect | segment")
    return SEGMENT_OUTPUT_NAMES if task == "segment" else OUTPUT_NAMES


@dataclass
class ModelMeta:
    class_names: list[str]
    img_size: tuple[int, int]  # network input (h, w)
    keep_ratio: bool = False  # True: letterbox with grey padding; False: plain resize
    model_name: str = "n"
    arch: str = "dfine"  # model.arch (src/models/archs.py)
    num_queries: int = 300
    conf_thresh: float = DEFAULT_CONF  # the default score threshold
    class_thresholds: dict[str, float] = field(default_factory=dict)  # class name -> threshold (overrides)
    batch_size: int | None = 1  # fixed batch of the artifact; None = dynamic (up to max_batch_size)
    max_batch_size: int = 1
    precision: str = "fp32"  # weights precision of the artifact (fp32 | fp16 | int8)
    task: str = "detect"  # detect | segment (a segment artifact has a 4th output, "masks")
    version: int = META_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # anything else (source checkpoint, export options)

    def __post_init__(self) -> None:
        self.class_names = [str(n) for n in self.class_names]
        self.img_size = (int(self.img_size[0]), int(self.img_size[1]))
        self.class_thresholds = {str(k): float(v) for k, v in (self.class_thresholds or {}).items()}
        output_names(self.task)  # an unknown task fails here, not at the first inference
        unknown = sorted(set(self.class_thresholds) - set(self.class_names))
        if unknown:
            raise ValueError(f"class_thresholds name unknown classes {unknown}; classes: {self.class_names}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The artifact's graph outputs (a segment model has a 4th, "masks")."""
        return output_names(self.task)

    def thresholds_array(self, conf: float | dict | None = None) -> np.ndarray:
        """Per-class score thresholds (num_classes,): `conf` overrides the stored ones.

        conf: None -> stored defaults (global + per-class); float -> that value for every class;
        dict {class name or id: value} -> those classes changed, the others keep the stored defaults;
        array (num_classes,) -> taken as it is.
        """
        if isinstance(conf, np.ndarray) and conf.ndim == 1:
            if len(conf) != self.num_classes:
                raise ValueError(f"{len(conf)} thresholds for {self.num_classes} classes")
            return conf.astype(np.float32)
        if conf is not None and not isinstance(conf, dict):
            return np.full(self.num_classes, float(conf), np.float32)
        out = np.array([self.class_thresholds.get(n, self.conf_thresh) for n in self.class_names], np.float32)
        for key, value in (conf or {}).items():
            out[self.class_index(key)] = float(value)
        return out

    def class_index(self, key: str | int) -> int:
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and key not in self.class_names):
            index = int(key)
            if not 0 <= index < self.num_classes:
                raise ValueError(f"class id {index} out of range 0..{self.num_classes - 1}")
            return index
        if key not in self.class_names:
            raise ValueError(f"unknown class {key!r}; classes: {self.class_names}")
        return self.class_names.index(key)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = dict(kwargs.pop("extra", {}) or {})
        extra.update({k: v for k, v in data.items() if k not in known})  # keep unknown keys, do not fail
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, text: str, source: str | Path = "?") -> ModelMeta:
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: invalid {META_KEY} metadata: {err}") from err


# ---------------------------------------------------------------- checkpoint / thresholds.json


def read_thresholds(data: dict[str, Any] | None) -> tuple[float | None, dict[str, float]]:
    """(global threshold, per-class thresholds) from a thresholds.json / checkpoint-meta dict.

    Accepted keys (the trainer's thresholds.json): "conf_thresh" (or "conf", "threshold", "global") and
    "per_class" / "class_thresholds" ({name: value}); anything missing -> None / {}.
    """
    if not data:
        return None, {}
    conf = next((data[k] for k in ("conf_thresh", "conf", "threshold", "global") if k in data), None)
    per_class = next((data[k] for k in ("per_class", "class_thresholds") if k in data), None) or {}
    if isinstance(per_class, dict):
        per_class = {str(k): _as_threshold(v) for k, v in per_class.items()}
    return (_as_threshold(conf) if conf is not None else None), per_class


def _as_threshold(value: Any) -> float:
    if isinstance(value, dict):  # {"threshold": 0.4, "f1": ...}
        value = value.get("threshold", value.get("conf_thresh", value.get("conf")))
    return float(value)


def meta_from_checkpoint(meta: dict[str, Any], thresholds: dict[str, Any] | None = None) -> ModelMeta:
    """ModelMeta from the trainer's checkpoint "meta" dict (+ optional thresholds.json content)."""
    meta = dict(meta)
    conf, per_class = read_thresholds(meta.get("thresholds"))
    file_conf, file_per_class = read_thresholds(thresholds)
    conf = file_conf if file_conf is not None else conf
    per_class = {**per_class, **file_per_class}
    names = meta.get("class_names") or [str(i) for i in range(int(meta["num_classes"]))]
    per_class = {_class_name(k, names): v for k, v in per_class.items()}
    known = {f.name for f in fields(ModelMeta)}
    return ModelMeta(
        class_names=list(names),
        img_size=tuple(meta["img_size"]),
        keep_ratio=bool(meta.get("keep_ratio", False)),
        model_name=str(meta.get("model_name", "n")),
        arch=str(meta.get("arch") or LEGACY_VARIANT_ARCH[str(meta.get("variant", "dfine"))]),
        num_queries=int(meta.get("num_queries", 300)),
        task=str(meta.get("task", "detect")),
        conf_thresh=float(conf if conf is not None else meta.get("conf_thresh", DEFAULT_CONF)),
        class_thresholds=per_class,
        extra={k: v for k, v in meta.items() if k not in known and k != "thresholds"},
    )


def _class_name(key: str, names: list[str]) -> str:
    """Per-class thresholds may be keyed by name or by id; store by name."""
    if key in names:
        return key
    if key.lstrip("-").isdigit() and 0 <= int(key) < len(names):
        return names[int(key)]
    raise ValueError(f"threshold for unknown class {key!r}; classes: {names}")


# ---------------------------------------------------------------- embedding in artifacts


def write_onnx_meta(onnx_model, meta: ModelMeta) -> None:
    """Set metadata_props[META_KEY] on an onnx.ModelProto (in place)."""
    for prop in list(onnx_model.metadata_props):
        if prop.key == META_KEY:
            onnx_model.metadata_props.remove(prop)
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.to_json()


def read_onnx_meta_map(custom_map: dict[str, str], source: str | Path) -> ModelMeta:
    if META_KEY not in custom_map:
        raise ValueError(
            f"{source}: no '{META_KEY}' metadata; export it with `python -m src.dl.export` "
            "(models exported elsewhere do not know their classes and input size)"
        )
    return ModelMeta.from_json(custom_map[META_KEY], source)


def write_openvino_meta(ov_model, meta: ModelMeta) -> None:
    ov_model.set_rt_info(meta.to_json(), [META_KEY])


def read_openvino_meta(ov_model, source: str | Path) -> ModelMeta:
    if not ov_model.has_rt_info([META_KEY]):
        raise ValueError(f"{source}: no '{META_KEY}' rt_info; export it with `python -m src.dl.export`")
    return ModelMeta.from_json(ov_model.get_rt_info([META_KEY]).astype(str), source)


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(engine_path: str | Path, meta: ModelMeta) -> Path:
    return atomic_write_text(
        sidecar_path(engine_path), json.dumps(asdict(meta), indent=2, default=str) + "\n"
    )


def read_sidecar(engine_path: str | Path) -> ModelMeta:
    path = sidecar_path(engine_path)
    if not path.exists():
        raise FileNotFoundError(
            f"{engine_path}: metadata sidecar {path} is missing (written by src.dl.export)"
        )
    return ModelMeta.from_json(path.read_text(encoding="utf-8"), path)
