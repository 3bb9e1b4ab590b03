"""Starting a model from released or earlier weights: which detector a file holds, and loading it.

Accepted inputs (src/models/checkpoint.py reads them): an official training file ({"ema": {"module": sd,
...}, "model": sd, ...}), one of ours ({"model": sd, "ema": sd | None, "meta": {...}}), or a bare state
dict; EMA weights win when present. Keys whose shape depends on the number of classes (the score heads,
the denoising class embedding), on the number of queries (learned query embeddings) or on the image size
(anchor buffers) may differ: the model keeps its own values there. If the checkpoint is a COCO-80 one and
some of the user's class names are COCO names, those classes start from the COCO rows instead.

`checkpoint_arch` tells which detector (model.arch) a file holds where the file allows it;
`pretrained_mismatch` refuses a file of another family or size in one line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from src.common.config_rules import LEGACY_VARIANT_ARCH
from src.models.archs import ARCH_SIZES, ARCH_TITLES, display_name
from src.models.build import build, family_holding, family_of
from src.models.checkpoint import Checkpoint, read_checkpoint
from src.models.spec import ModelSpec

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip  # the 80 COCO detection classes in the official label order (category ids ascending)

# COCO category id of each of COCO_CLASSES: DETR's official files index their class rows by these ids.
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
    *range(84, 91),
)  # fmt: skip
# DETR's class head: one row per class, then "no object" (the last row). Official COCO files have 92 rows
# (category ids 0..90, the unused ones empty, + "no object"); a file trained on COCO's 80 classes in order
# has 81.
DETR_CLASS_HEAD = "class_embed."
DETR_COCO_ID_ROWS = 92

# Key fragments whose tensor shape follows the model's configuration rather than its architecture.
# rows = classes (+1 padding row for D-FINE's denoising embedding, +1 "no object" row for DETR's class_embed)
CLASS_DEPENDENT = ("score_head", "class_embed")
QUERY_DEPENDENT = ("tgt_embed", "query_embed")  # learned query content, rows = queries
IMAGE_SIZE_DEPENDENT = ("anchors", "valid_mask")  # buffers precomputed for the export image size


@dataclass
class LoadReport:
    source: str
    weights: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # shape follows classes/queries/image size
    class_rows_from_coco: dict[str, str] = field(default_factory=dict)  # our class -> COCO class
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    meta: dict = field(default_factory=dict)
    arch: str | None = None  # the model.arch checkpoint_arch recognises; None: cannot tell
    arch_reason: str = ""
    key_prefix: str = ""  # a backbone-only file: the model prefix its keys were read under
    no_object_row: bool = False  # DETR's class head re-initialised but its "no object" row kept

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.reinitialised) + len(self.missing)
        lines = [f"loaded {len(self.loaded)}/{total} tensors from {self.source} ({self.weights} weights)"]
        lines.append(f"arch: {self.arch or 'unknown'} ({self.arch_reason})")
        if self.key_prefix:
            lines.append(f"a backbone-only file: its keys were read under {self.key_prefix!r}")
        if self.loaded:
            lines.append("reused: " + ", ".join(f"{part} {n}" for part, n in self.reused_parts().items()))
        if self.reinitialised:
            kinds = "; ".join(f"{kind} {_short(keys)}" for kind, keys in self.reinitialised_kinds().items())
            lines.append(f"re-initialised (shape follows classes, queries or image size): {kinds}")
        if self.class_rows_from_coco:
            pairs = ", ".join(f"{ours}<-{coco}" for ours, coco in self.class_rows_from_coco.items())
            lines.append(f"classes started from COCO rows: {pairs}")
        if self.no_object_row:
            lines.append("the class head's no-object row was kept from the checkpoint")
        fresh_masks = [key for key in self.missing if key.startswith("mask_head.")]
        if fresh_masks:  # a detection checkpoint in a segmentation model
            lines.append(f"mask branch not in the checkpoint: it starts fresh ({len(fresh_masks)} tensors)")
        others = [key for key in self.missing if not key.startswith("mask_head.")]
        if others:
            lines.append(f"missing in the checkpoint (model's own values kept): {_short(others)}")
        if self.unexpected:
            lines.append(f"ignored (not in the model): {_short(self.unexpected)}")
        return "\n  ".join(lines)

    def reused_parts(self) -> dict[str, int]:
        """Loaded tensors per model part: {"backbone": n, "encoder": n, "decoder": n, ...} in model order."""
        return dict(Counter(model_part(key) for key in self.loaded))

    def reinitialised_kinds(self) -> dict[str, list[str]]:
        """Re-initialised tensors by what they are: {"class heads": [...], "denoising class embedding": [...],
        "query embeddings": [...], "image-size buffers": [...]}."""
        kinds: dict[str, list[str]] = {kind: [] for kind in TENSOR_KINDS}
        for key in self.reinitialised:
            kinds[tensor_kind(key)].append(key)
        return {kind: keys for kind, keys in kinds.items() if keys}


def model_part(key: str) -> str:
    """The part of the detector a state-dict key belongs to: its first name (backbone, encoder, decoder,
    class_embed, ...), with DETR's transformer split into transformer.encoder / transformer.decoder."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "transformer" and len(parts) > 1 else parts[0]


TENSOR_KINDS = ("class heads", "denoising class embedding", "query embeddings", "image-size buffers")


def tensor_kind(key: str) -> str:
    """What a class / query / image-size dependent tensor is, in words for the load report."""
    if "denoising_class_embed" in key:
        return "denoising class embedding"
    if any(part in key for part in CLASS_DEPENDENT):
        return "class heads"
    if any(part in key for part in QUERY_DEPENDENT):
        return "query embeddings"
    return "image-size buffers"


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


def checkpoint_arch(path_or_state: str | Path | Mapping | Checkpoint) -> tuple[str | None, str]:
    """(model.arch, reason) when the checkpoint shows which detector it holds, else (None, why not).

    Our own checkpoints record it in their metadata ("variant" before "arch" existed); other files are
    recognised by their family's key names, and the family tells its archs apart where the file allows.
    """
    checkpoint = path_or_state if isinstance(path_or_state, Checkpoint) else read_checkpoint(path_or_state)
    recorded = checkpoint.meta.get("arch") or LEGACY_VARIANT_ARCH.get(str(checkpoint.meta.get("variant")))
    if recorded:
        return str(recorded), f"its metadata records arch={recorded}"
    family = family_holding(checkpoint.state)
    if family is None:
        return None, "its tensor names match no detector family of this project"
    return family.arch_of(checkpoint.state, Path(checkpoint.source).name.lower())


def checkpoint_arch_overrides(path_or_state: str | Path | Mapping) -> dict:
    """Architecture fields to build a model the checkpoint fits (D-FINE: decoder FFN width, LAB blocks, BN
    kind): `spec.with_arch_overrides(checkpoint_arch_overrides(path))`; {} for a file of no known family."""
    state = read_checkpoint(path_or_state).state
    family = family_holding(state)
    return family.arch_overrides(state) if family is not None else {}


def pretrained_mismatch(path_or_state: str | Path | Mapping, spec: ModelSpec) -> str | None:
    """One line saying why the checkpoint cannot start a model of `spec` (another family, another size),
    naming what the file holds and what was asked for; None when it fits (or cannot be told)."""
    checkpoint = read_checkpoint(path_or_state)
    family = family_holding(checkpoint.state)
    wanted = family_of(spec.arch)
    if family is None:
        return None  # a bare or partial state dict: load_pretrained reports what it finds
    if family is not wanted:
        arch, _ = checkpoint_arch(checkpoint)
        held = ARCH_TITLES[arch] if arch else "/".join(ARCH_TITLES[a] for a in family.archs)
        return (
            f"{checkpoint.source} holds {held} weights, but model.arch={spec.arch} asks for "
            f"{ARCH_TITLES[spec.arch]}: set model.arch to the checkpoint's family or pick a {ARCH_TITLES[spec.arch]} "
            "checkpoint"
        )
    sizes = fitting_sizes(checkpoint.state, spec)
    recorded = checkpoint.meta.get("model_name")  # ours say it (DETR's r50 and r50_dc5 share every tensor)
    if recorded in sizes and checkpoint_arch(checkpoint)[0] == spec.arch:
        sizes = [recorded]
    if sizes and spec.size not in sizes:
        return (
            f"{checkpoint.source} holds {' or '.join(display_name(spec.arch, s) for s in sizes)} weights, but "
            f"model.name={spec.size} asks for {spec.display_name}: set model.name={sizes[0]} or pick a "
            f"{spec.display_name} checkpoint"
        )
    return None


def fitting_sizes(state: Mapping[str, torch.Tensor], spec: ModelSpec) -> list[str]:
    """The sizes of spec.arch whose architecture has the checkpoint's tensors (built on the meta device: no
    memory, no weights): the same names with the same shapes, ignoring the keys that follow classes,
    queries or image size, BatchNorm counters and a mask branch. Names count too: a smaller size's tensors
    can all lie inside a bigger one with the same shapes (ResNet-18 / 34 blocks, decoder layers)."""
    overrides = family_of(spec.arch).arch_overrides(state)
    fitting = []
    for size in ARCH_SIZES[spec.arch]:
        candidate = replace(spec, size=size, task="detect", arch_overrides=overrides)
        with torch.device("meta"):
            own = build(candidate).model.state_dict()
        shared = [key for key in state if key in own and not _depends_on_config(key)]
        # Both ways: a deeper backbone holds every key of a shallower one (ResNet-101 vs -50) with equal shapes.
        same_keys = _architecture_keys(state) == _architecture_keys(own)
        if shared and same_keys and all(tuple(state[key].shape) == tuple(own[key].shape) for key in shared):
            fitting.append(size)
    return fitting


def _architecture_keys(state: Mapping[str, torch.Tensor]) -> set[str]:
    """The keys that make an architecture: not those following classes / queries / image size, the mask
    branch (candidates are built as detectors) or BatchNorm step counters."""
    return {
        key
        for key in state
        if not _depends_on_config(key)
        and not key.startswith("mask_head.")
        and not key.endswith("num_batches_tracked")
    }


def load_pretrained(
    model: nn.Module, path_or_state: str | Path | Mapping, class_names: Sequence[str] | Mapping | None = None
) -> LoadReport:
    """Load weights into `model` in place, adapting what depends on classes / queries / image size.

    class_names: the model's class names (list, or {id: name}); with a COCO-80 checkpoint, classes whose
    names are COCO names start from the COCO rows. Any other shape difference means another
    architecture and raises (build the model with `checkpoint_arch_overrides`).
    """
    checkpoint = read_checkpoint(path_or_state)
    own = model.state_dict()
    report = LoadReport(source=checkpoint.source, weights=checkpoint.weights, meta=checkpoint.meta)
    report.arch, report.arch_reason = checkpoint_arch(checkpoint)
    report.key_prefix = backbone_file_prefix(checkpoint, own)
    state = {report.key_prefix + key: tensor for key, tensor in checkpoint.state.items()}
    to_load, mismatched = {}, []
    for key, tensor in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tensor.shape == own[key].shape:
            to_load[key] = tensor
            report.loaded.append(key)
        elif _depends_on_config(key):
            report.reinitialised.append(key)
        else:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
    report.missing = [k for k in own if k not in state]
    if not report.key_prefix:
        _check_architecture(checkpoint, mismatched, report, len(own))

    class_rows = _coco_rows(class_names, state, report)
    with torch.no_grad():
        for key, tensor in to_load.items():
            own[key].copy_(tensor.to(own[key].dtype))
        for key in report.reinitialised:
            if class_rows and any(part in key for part in CLASS_DEPENDENT):
                for ours, coco in class_rows:
                    own[key][ours] = state[key][coco].to(own[key].dtype)
            if key.startswith(DETR_CLASS_HEAD):  # "no object" does not depend on which classes there are
                own[key][-1] = state[key][-1].to(own[key].dtype)
                report.no_object_row = True
    logger.info(f"pretrained weights: {report}")
    return report


def backbone_file_prefix(checkpoint: Checkpoint, own: Mapping[str, torch.Tensor]) -> str:
    """'' for a detector's checkpoint. For a backbone-only file (torchvision's ResNet: conv1.weight,
    layer1.0...; HGNetv2's stage-1 file) the model prefix its keys live under (backbone.0.body. in DETR),
    found from the names themselves. The backbone must be all there and nothing of another depth may be
    left over (a ResNet-101 file holds every ResNet-50 tensor): otherwise one line says what is wrong."""
    state = checkpoint.state
    if any(key in own for key in state):
        return ""
    prefixes = Counter(key[: -len(name)] for name in state for key in own if key.endswith("." + name))
    if not prefixes:
        return ""
    prefix, found = prefixes.most_common(1)[0]
    body = {key[len(prefix) :] for key in own if key.startswith(prefix)}
    parts = {key.split(".")[0] for key in body}  # conv1, bn1, layer1, ...: what the backbone is made of
    # a trainable BatchNorm counts its batches itself: ImageNet files without the counter fit
    missing = sorted(k for k in body - set(state) if not k.endswith("num_batches_tracked"))
    extra = sorted(
        k
        for k in state
        if k not in body and k.split(".")[0] in parts and not k.endswith("num_batches_tracked")
    )
    if found < len(body) // 2 or missing or extra:
        raise ValueError(
            f"{checkpoint.source} is a backbone file that does not fit this model's backbone ({prefix}*): "
            f"{len(missing)} of its tensors missing, {len(extra)} of another depth (e.g. {(missing + extra)[:3]})"
        )
    return prefix


def _depends_on_config(key: str) -> bool:
    return any(part in key for part in CLASS_DEPENDENT + QUERY_DEPENDENT + IMAGE_SIZE_DEPENDENT)


def _check_architecture(
    checkpoint: Checkpoint, mismatched: list[str], report: LoadReport, num_own: int
) -> None:
    if mismatched:
        listed = "\n  ".join(mismatched[:10]) + ("\n  ..." if len(mismatched) > 10 else "")
        raise ValueError(
            f"{checkpoint.source} does not fit this model's architecture ({len(mismatched)} tensors differ):\n"
            f"  {listed}\nCheck model.arch / model.name, or build the model with "
            "arch_overrides=src.models.checkpoint.checkpoint_arch_overrides(path) (released COCO files and the "
            "parity configuration differ in decoder FFN width and LAB blocks)."
        )
    if len(report.loaded) < num_own // 2:
        raise ValueError(
            f"{checkpoint.source}: only {len(report.loaded)} of the model's {num_own} tensors found there; "
            f"is it a D-FINE checkpoint? (e.g. missing: {report.missing[:5]}, unknown: {report.unexpected[:5]})"
        )


def normalise_class_name(name: str) -> str:
    """'Traffic_Light', 'traffic light', 'TrafficLight' -> 'trafficlight'."""
    return "".join(ch for ch in str(name).lower() if ch not in " _-")


_COCO_INDEX = {normalise_class_name(name): i for i, name in enumerate(COCO_CLASSES)}


def _coco_rows(class_names, state: dict[str, torch.Tensor], report: LoadReport) -> list[tuple[int, int]]:
    """(our class index, COCO index) for every class named like a COCO class, if the checkpoint is COCO-80
    and its class heads are being re-initialised."""
    if class_names is None or not any(any(p in k for p in CLASS_DEPENDENT) for k in report.reinitialised):
        return []
    names = (
        [class_names[k] for k in sorted(class_names)]
        if isinstance(class_names, Mapping)
        else list(class_names)
    )
    coco_rows = _checkpoint_coco_rows(state)
    if coco_rows is None:
        logger.info("the checkpoint's class heads are not COCO's 80 classes: no class rows copied by name")
        return []
    rows = []
    for ours, name in enumerate(names):
        coco = _COCO_INDEX.get(normalise_class_name(name))
        if coco is not None:
            rows.append((ours, coco_rows[coco]))
            report.class_rows_from_coco[str(name)] = COCO_CLASSES[coco]
    return rows


def _checkpoint_coco_rows(state: Mapping[str, torch.Tensor]) -> Sequence[int] | None:
    """The row of each of COCO_CLASSES in the checkpoint's class heads, or None when they are not COCO's:
    D-FINE's score heads have the 80 classes in order; DETR's class_embed has them in order + "no object"
    (81 rows) or, in the official files, at their COCO category ids + "no object" (92 rows)."""
    for key, value in state.items():
        if "score_head" in key and key.endswith("bias"):
            return range(len(COCO_CLASSES)) if len(value) == len(COCO_CLASSES) else None
        if key == DETR_CLASS_HEAD + "bias":
            if len(value) == DETR_COCO_ID_ROWS:
                return COCO_CATEGORY_IDS
            return range(len(COCO_CLASSES)) if len(value) == len(COCO_CLASSES) + 1 else None
    return None
