"""One typed description of a detector: what the config asks for, what a checkpoint records, what `build` makes.

    spec = ModelSpec.from_config(cfg)           # once per stage: casts and checks model.* and label_to_name
    spec = ModelSpec.from_meta(checkpoint_meta)  # what a saved model was built as
    model, criterion, postprocessor = build(spec)  # src.models.build

Every other module takes sizes and class lists from a spec instead of casting config values itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from src.common.config import label_names
from src.common.config_rules import LEGACY_VARIANT_ARCH
from src.common.errors import ConfigError
from src.models.archs import check_arch, default_queries, display_name

ONE_CLASS_NAME = "object"  # the single class of a model.use_one_class model
TASKS = ("detect", "segment")  # model.task: "segment" adds the mask branch (src/models/mask_head.py)


@dataclass(frozen=True)
class ModelSpec:
    """What a detector is: enough to build it (src.models.build), to write its checkpoint meta and to read
    one back. Frozen and checked on creation, so a spec that exists is a buildable one."""

    arch: str  # dfine | deim_dfine | rtdetrv2 | ... (src/models/archs.py)
    size: str  # model.name: one of the arch's sizes (n..x for D-FINE, r18.. for RT-DETRv2, r50.. for DETR)
    img_size: tuple[int, int]  # network input (h, w), multiples of 32
    data_class_names: tuple[str, ...]  # the data set's classes (label_to_name, ids 0..N-1)
    num_queries: int = 300
    keep_ratio: bool = False  # letterbox (True) or plain resize (False) to img_size
    use_one_class: bool = False  # every data class trained as the one class "object"
    task: str = "detect"  # detect | segment (adds the mask branch, src/models/mask_head.py)
    arch_overrides: dict = field(default_factory=dict)  # size-table fields a checkpoint fixes (family's own)

    def __post_init__(self) -> None:
        check_arch(self.arch, self.size)
        h, w = (int(v) for v in self.img_size)
        if h <= 0 or w <= 0 or h % 32 or w % 32:
            raise ConfigError(f"model.img_size must be two positive multiples of 32 [h, w], got {[h, w]}")
        if int(self.num_queries) < 1:
            raise ConfigError(f"model.num_queries must be >= 1, got {self.num_queries}")
        if not self.data_class_names:
            raise ConfigError("label_to_name names no class")
        if self.task not in TASKS:
            raise ConfigError(f"model.task must be one of {' | '.join(TASKS)}, got {self.task!r}")
        object.__setattr__(self, "img_size", (h, w))
        object.__setattr__(self, "num_queries", int(self.num_queries))
        object.__setattr__(self, "data_class_names", tuple(str(n) for n in self.data_class_names))
        object.__setattr__(self, "arch_overrides", dict(self.arch_overrides or {}))

    # ------------------------------------------------------------------ what the model predicts

    @property
    def class_names(self) -> list[str]:
        """The model's output classes: the data's, or ["object"] with use_one_class."""
        return [ONE_CLASS_NAME] if self.use_one_class else list(self.data_class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def display_name(self) -> str:
        """'D-FINE-N', 'RT-DETRv2-R18', ...: how logs and reports name the model."""
        return display_name(self.arch, self.size)

    def with_arch_overrides(self, overrides: Mapping) -> ModelSpec:
        return replace(self, arch_overrides=dict(overrides))

    # ------------------------------------------------------------------ config and checkpoint meta

    @classmethod
    def from_config(cls, cfg, arch_overrides: Mapping | None = None) -> ModelSpec:
        """From cfg.model and cfg.label_to_name (the one place their values are cast)."""

        model = cfg.model
        try:
            names = label_names(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return cls(
            arch=str(model.arch),
            size=str(model.name),
            img_size=_pair(model.img_size),
            data_class_names=tuple(names),
            num_queries=int(
                default_queries(str(model.arch)) if model.num_queries is None else model.num_queries
            ),
            keep_ratio=bool(model.keep_ratio),
            use_one_class=bool(model.use_one_class),
            task=str(model.task),
            arch_overrides=dict(arch_overrides or {}),
        )

    def to_meta(self) -> dict:
        """The model part of a checkpoint's "meta" (src.runtime.meta reads these keys)."""
        return {
            "arch": self.arch,
            "model_name": self.size,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "data_class_names": list(self.data_class_names),
            "use_one_class": self.use_one_class,
            "img_size": list(self.img_size),
            "keep_ratio": self.keep_ratio,
            "num_queries": self.num_queries,
            "task": self.task,
            "arch_overrides": dict(self.arch_overrides),  # build(spec) rebuilds the same architecture
        }

    @classmethod
    def from_meta(cls, meta: Mapping) -> ModelSpec:
        """From a checkpoint's "meta" (also those written before arch / use_one_class / data_class_names
        existed: their "variant" names the D-FINE arch). src.models.build.spec_from_checkpoint also reads
        the architecture overrides off the weights."""
        names = list(meta.get("class_names") or [str(i) for i in range(int(meta["num_classes"]))])
        one_class = bool(meta.get("use_one_class", False))
        return cls(
            arch=str(meta.get("arch") or LEGACY_VARIANT_ARCH[str(meta.get("variant", "dfine"))]),
            size=str(meta["model_name"]),
            img_size=_pair(meta["img_size"]),
            data_class_names=tuple(meta.get("data_class_names") or names),
            num_queries=int(meta["num_queries"]),
            keep_ratio=bool(meta.get("keep_ratio", False)),
            use_one_class=one_class,
            task=str(meta.get("task", "detect")),  # checkpoints before segmentation are detectors
            arch_overrides=dict(meta.get("arch_overrides") or {}),
        )


def _pair(value: Sequence) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.img_size must be [h, w] integers, got {value!r}") from err
    return h, w
