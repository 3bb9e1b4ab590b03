"""Our checkpoint format (written and read only here), and loading pretrained weights into a model.

Ours: `save_run_checkpoint(path, RunCheckpoint)` / `load_run_checkpoint(path)`. best.pt holds the weights to
use; last.pt also everything a resumed run needs (`RunCheckpoint.training`). The dict on disk:
    {"version", "model": state dict, "ema": None | {"module", "updates"}, "meta": ModelSpec.to_meta() +
     thresholds, metrics, epoch, "config": the run's resolved config, + last.pt: optimizer, scheduler, scaler,
     state, epoch, step, rng, partial_losses, wandb_id}
Both load with torch.load(weights_only=True), so either can also be a train.pretrained_model_path.

Pretrained weights:

Accepted inputs: an official D-FINE/DEIM training file ({"ema": {"module": sd, ...}, "model": sd, ...}),
one of ours ({"model": sd, "ema": sd | None, "meta": {...}}), or a bare state dict; EMA weights win when
present. Keys whose shape depends on the number of classes (the score heads, the denoising class
embedding), on the number of queries (learned query embeddings) or on the image size (anchor buffers)
may differ: the model keeps its own values there. If the checkpoint is a COCO-80 one and some of the
user's class names are COCO names, those classes start from the COCO rows instead.

`find_pretrained` locates (or downloads once) the released files under pretrained/ (see its README.md).
`checkpoint_variant` tells D-FINE from DEIM-D-FINE weights where the file allows it.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from src.common.io import atomic_torch_save, atomic_write
from src.d_fine.spec import ModelSpec

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

# Key fragments whose tensor shape follows the model's configuration rather than its architecture.
CLASS_DEPENDENT = ("score_head", "denoising_class_embed")  # rows = classes (+1 padding row for the embedding)
QUERY_DEPENDENT = ("tgt_embed", "query_embed")  # learned query content, rows = queries
IMAGE_SIZE_DEPENDENT = ("anchors", "valid_mask")  # buffers precomputed for the export image size

# Official release files (README of Peterande/D-FINE); DEIM publishes on Google Drive (no direct download).
DFINE_RELEASE_URL = "https://github.com/Peterande/storage/releases/download/dfinev1.0/"
DFINE_RELEASE_FILES = {
    **{(size, "coco"): f"dfine_{size}_coco.pth" for size in "nsmlx"},
    **{(size, "obj365"): f"dfine_{size}_obj365.pth" for size in "smlx"},
    **{(size, "obj2coco"): f"dfine_{size}_obj2coco.pth" for size in "smx"},
    ("l", "obj2coco"): "dfine_l_obj2coco_e25.pth",  # the release's best L Objects365+COCO model
}
DEIM_DRIVE_LINKS = {
    ("n", "coco"): "https://drive.google.com/file/d/1ZPEhiU9nhW4M5jLnYOFwTSLQC1Ugf62e/view",
    ("s", "coco"): "https://drive.google.com/file/d/1tB8gVJNrfb6dhFvoHJECKOF5VpkthhfC/view",
    ("m", "coco"): "https://drive.google.com/file/d/18Lj2a6UN6k_n_UzqnJyiaiLGpDzQQit8/view",
    ("l", "coco"): "https://drive.google.com/file/d/1PIRf02XkrA2xAD3wEiKE2FaamZgSGTAr/view",
    ("x", "coco"): "https://drive.google.com/file/d/1dPtbgtGgq1Oa7k_LgH1GXPelg1IVeu0j/view",
    ("x", "obj365"): "https://drive.google.com/file/d/1RMNrHh3bYN0FfT5ZlWhXtQxkG23xb2xj/view",
}
DOWNLOAD_TIMEOUT_S = 20  # per network operation: fail fast when offline, never on a slow but live link


CHECKPOINT_VERSION = 1
# last.pt only: what a resumed run restores (top-level keys of the file)
TRAINING_KEYS = (
    "ema", "optimizer", "scheduler", "scaler", "state", "epoch", "step", "rng", "partial_losses", "wandb_id",
)  # fmt: skip


@dataclass
class RunCheckpoint:
    """One of our checkpoints: the model (spec + weights), how the run was configured, what it scored."""

    spec: ModelSpec
    model: dict[str, torch.Tensor]  # the weights to use (best.pt: the evaluated ones, EMA when on)
    config: dict  # the run's resolved config
    thresholds: dict = field(default_factory=dict)  # score thresholds picked on val
    metrics: dict = field(default_factory=dict)  # val metrics of these weights
    epoch: int = 0  # the epoch (1-based) these weights come from
    training: dict | None = None  # last.pt: TRAINING_KEYS (None in best.pt)
    version: int = CHECKPOINT_VERSION

    @property
    def meta(self) -> dict:
        return self.spec.to_meta() | {
            "thresholds": self.thresholds,
            "metrics": self.metrics,
            "epoch": self.epoch,
        }


def save_run_checkpoint(path: str | Path, checkpoint: RunCheckpoint) -> Path:
    """Write `checkpoint` atomically (a kill never leaves half a file under the name)."""
    raw = {
        "version": checkpoint.version,
        "model": checkpoint.model,
        "ema": None,
        "meta": checkpoint.meta,
        "config": checkpoint.config,
    }
    if checkpoint.training is not None:
        unknown = set(checkpoint.training) - set(TRAINING_KEYS)
        if unknown:
            raise ValueError(f"unknown training checkpoint keys {sorted(unknown)}; known: {TRAINING_KEYS}")
        raw |= checkpoint.training
    return atomic_torch_save(path, raw)


def load_run_checkpoint(path: str | Path, mmap: bool = False) -> RunCheckpoint:
    """Read one of our checkpoints (best.pt / last.pt). mmap: tensors stay on disk until used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    meta = raw.get("meta") if isinstance(raw, Mapping) else None
    if not isinstance(meta, Mapping) or "img_size" not in meta or not isinstance(raw.get("model"), Mapping):
        raise ValueError(
            f"{path}: not a checkpoint of this project (no 'model' and 'meta' with classes and input size); "
            "official D-FINE weights are used via train.pretrained_model_path"
        )
    training = {key: raw[key] for key in TRAINING_KEYS if key in raw} if "optimizer" in raw else None
    return RunCheckpoint(
        spec=ModelSpec.from_meta(meta),
        model=dict(raw["model"]),
        config=dict(raw.get("config") or {}),
        thresholds=dict(meta.get("thresholds") or {}),
        metrics=dict(meta.get("metrics") or {}),
        epoch=int(meta.get("epoch") or 0),
        training=training,
        version=int(raw.get("version", CHECKPOINT_VERSION)),
    )


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    meta: dict
    source: str  # where it came from, for messages
    weights: str  # which weights were taken: "ema", "model" or "state_dict"


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
    variant: str | None = None  # "dfine" | "deim" as checkpoint_variant recognises it; None: cannot tell
    variant_reason: str = ""

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.reinitialised) + len(self.missing)
        lines = [f"loaded {len(self.loaded)}/{total} tensors from {self.source} ({self.weights} weights)"]
        lines.append(f"variant: {self.variant or 'unknown'} ({self.variant_reason})")
        if self.reinitialised:
            lines.append(
                f"re-initialised (shape follows classes, queries or image size): {_short(self.reinitialised)}"
            )
        if self.class_rows_from_coco:
            pairs = ", ".join(f"{ours}<-{coco}" for ours, coco in self.class_rows_from_coco.items())
            lines.append(f"classes started from COCO rows: {pairs}")
        fresh_masks = [key for key in self.missing if key.startswith("mask_head.")]
        if fresh_masks:  # a detection checkpoint in a segmentation model
            lines.append(f"mask branch not in the checkpoint: it starts fresh ({len(fresh_masks)} tensors)")
        others = [key for key in self.missing if not key.startswith("mask_head.")]
        if others:
            lines.append(f"missing in the checkpoint (model's own values kept): {_short(others)}")
        if self.unexpected:
            lines.append(f"ignored (not in the model): {_short(self.unexpected)}")
        return "\n  ".join(lines)


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


# Files read inside `shared_checkpoint_reads()`: (path, mtime, size) -> Checkpoint; None outside it.
_SHARED_READS: dict[tuple, Checkpoint] | None = None


@contextmanager
def shared_checkpoint_reads():
    """Within the block, reading the same unchanged file again returns the first read (its tensors are
    shared: read-only use). Training start asks a pretrained file for its variant, its architecture and its
    weights: one torch.load instead of three. Nothing is kept after the block."""
    global _SHARED_READS
    outer, _SHARED_READS = _SHARED_READS, ({} if _SHARED_READS is None else _SHARED_READS)
    try:
        yield
    finally:
        _SHARED_READS = outer


def read_checkpoint(path_or_state: str | Path | Mapping) -> Checkpoint:
    """The weights inside any accepted checkpoint format (EMA preferred), with its metadata."""
    if isinstance(path_or_state, Mapping):
        return _parse_checkpoint(path_or_state, "<state dict>")
    path = Path(path_or_state)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if _SHARED_READS is not None and key in _SHARED_READS:
        return _SHARED_READS[key]
    checkpoint = _load_checkpoint_file(path)
    if _SHARED_READS is not None:
        _SHARED_READS[key] = checkpoint
    return checkpoint


def _load_checkpoint_file(path: Path) -> Checkpoint:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable torch checkpoint of tensors ({error})") from error
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(raw).__name__}")
    return _parse_checkpoint(raw, str(path))


def _parse_checkpoint(raw: Mapping, source: str) -> Checkpoint:
    meta = dict(raw.get("meta") or {})
    ema = raw.get("ema")
    if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):  # official: {"module", "updates"}
        state, weights = ema["module"], "ema"
    elif isinstance(ema, Mapping) and ema and _is_state_dict(ema):  # ours: the EMA state dict itself
        state, weights = ema, "ema"
    elif isinstance(raw.get("model"), Mapping):
        state, weights = raw["model"], "model"
    elif _is_state_dict(raw):
        state, weights = raw, "state_dict"
    else:
        raise ValueError(
            f"{source}: no weights found; expected a state dict or a dict with 'ema' / 'model' "
            f"(top-level keys: {sorted(map(str, raw))[:10]})"
        )
    # DistributedDataParallel / torch.compile wrappers prefix every key
    state = {_strip_wrappers(k): v for k, v in state.items() if torch.is_tensor(v)}
    return Checkpoint(state=state, meta=meta, source=source, weights=weights)


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _strip_wrappers(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def checkpoint_variant(path_or_state: str | Path | Mapping | Checkpoint) -> tuple[str | None, str]:
    """(variant, reason): "dfine" or "deim" when the checkpoint shows which, else (None, why not).

    Evidence, strongest first:
    1. our own checkpoints record meta["variant"];
    2. frozen BatchNorm in the backbone (running stats without num_batches_tracked) is official D-FINE L/X:
       DEIM trains every BatchNorm, so ordinary BatchNorm in an L/X-size backbone is DEIM;
    3. a file name containing "deim" (the DEIM release names do), or an official D-FINE release name.
    Official n/s/m files of the two have the same tensors (they differ only in the decoder activation,
    ReLU vs SiLU): without a telling name there is no way to know.
    """
    from src.d_fine.sizes import VARIANTS

    checkpoint = path_or_state if isinstance(path_or_state, Checkpoint) else read_checkpoint(path_or_state)
    recorded = checkpoint.meta.get("variant")
    if recorded in VARIANTS:
        return str(recorded), f"its metadata records variant={recorded}"
    frozen_norm = _frozen_backbone_norm(checkpoint.state)
    if frozen_norm:
        return "dfine", "frozen BatchNorm in the backbone (official D-FINE L/X; DEIM trains every BatchNorm)"
    if frozen_norm is False and _is_large_backbone(checkpoint.state):
        return "deim", "trained BatchNorm in an L/X backbone (DEIM; official D-FINE L/X freeze it)"
    name = Path(checkpoint.source).name.lower()
    if "deim" in name:
        return "deim", f"the file name {name!r} contains 'deim'"
    dfine_names = set(DFINE_RELEASE_FILES.values()) | {
        pretrained_filename(*key) for key in DFINE_RELEASE_FILES
    }
    if name in dfine_names:
        return "dfine", f"{name!r} is an official D-FINE release file name"
    return None, (
        "D-FINE and DEIM-D-FINE cannot be told apart from this file: their n/s/m checkpoints have the same "
        "tensors (only the decoder activation differs, ReLU vs SiLU)"
    )


def _frozen_backbone_norm(state: Mapping[str, torch.Tensor]) -> bool | None:
    """True: frozen BatchNorm in the backbone; False: ordinary BatchNorm; None: no backbone norms."""
    from src.d_fine.sizes import arch_overrides_from_state_dict

    return arch_overrides_from_state_dict(state).get("freeze_norm")


def _is_large_backbone(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the HGNetv2 backbones of sizes l and x (their last stage has more channels than n/s/m's)."""
    from src.d_fine.hgnetv2 import ARCHS
    from src.d_fine.sizes import SIZES

    def widest(backbone: str) -> int:
        return ARCHS[backbone][1][-1].out_channels

    smaller = max(widest(SIZES[size].backbone) for size in "nsm")
    channels = [
        int(tensor.shape[0])
        for key, tensor in state.items()
        if key.startswith("backbone.") and key.endswith(".weight") and tensor.ndim == 4
    ]
    return bool(channels) and max(channels) > smaller


def checkpoint_arch_overrides(path_or_state: str | Path | Mapping) -> dict:
    """Architecture fields to build a model the checkpoint fits (decoder FFN width, LAB blocks, BN kind):
    `build_model(size, n, arch_overrides=checkpoint_arch_overrides(path))`."""
    from src.d_fine.sizes import arch_overrides_from_state_dict

    return arch_overrides_from_state_dict(read_checkpoint(path_or_state).state)


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
    report.variant, report.variant_reason = checkpoint_variant(checkpoint)
    to_load, mismatched = {}, []
    for key, tensor in checkpoint.state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tensor.shape == own[key].shape:
            to_load[key] = tensor
            report.loaded.append(key)
        elif _depends_on_config(key):
            report.reinitialised.append(key)
        else:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
    report.missing = [k for k in own if k not in checkpoint.state]
    _check_architecture(checkpoint, mismatched, report, len(own))

    class_rows = _coco_rows(class_names, checkpoint.state, report)
    with torch.no_grad():
        for key, tensor in to_load.items():
            own[key].copy_(tensor.to(own[key].dtype))
        for key in report.reinitialised:
            if class_rows and any(part in key for part in CLASS_DEPENDENT):
                for ours, coco in class_rows:
                    own[key][ours] = checkpoint.state[key][coco].to(own[key].dtype)
    logger.info(f"pretrained weights: {report}")
    return report


def _depends_on_config(key: str) -> bool:
    return any(part in key for part in CLASS_DEPENDENT + QUERY_DEPENDENT + IMAGE_SIZE_DEPENDENT)


def _check_architecture(
    checkpoint: Checkpoint, mismatched: list[str], report: LoadReport, num_own: int
) -> None:
    if mismatched:
        listed = "\n  ".join(mismatched[:10]) + ("\n  ..." if len(mismatched) > 10 else "")
        raise ValueError(
            f"{checkpoint.source} does not fit this model's architecture ({len(mismatched)} tensors differ):\n"
            f"  {listed}\nCheck model.name / model.variant, or build the model with "
            "arch_overrides=src.d_fine.checkpoint.checkpoint_arch_overrides(path) (released COCO files and the "
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
    heads = [v for k, v in state.items() if "score_head" in k and k.endswith("bias")]
    checkpoint_classes = int(heads[0].shape[0]) if heads else 0
    if checkpoint_classes != len(COCO_CLASSES):
        logger.info(
            f"checkpoint has {checkpoint_classes} classes, not COCO's 80: no class rows copied by name"
        )
        return []
    rows = []
    for ours, name in enumerate(names):
        coco = _COCO_INDEX.get(normalise_class_name(name))
        if coco is not None:
            rows.append((ours, coco))
            report.class_rows_from_coco[str(name)] = COCO_CLASSES[coco]
    return rows


def pretrained_filename(model_name: str, dataset: str = "coco", variant: str = "dfine") -> str:
    """The file name find_pretrained looks for under pretrained/."""
    if variant == "deim":
        return f"deim_dfine_hgnetv2_{model_name}_{dataset}.pth"
    return f"dfine_{model_name}_{dataset}.pth"


def find_pretrained(
    model_name: str,
    dataset: str = "coco",
    variant: str = "dfine",
    pretrained_dir: str | Path = "pretrained",
    download: bool = True,
) -> Path:
    """Path of the released weights for size `model_name` trained on `dataset` (coco | obj365 | obj2coco).

    Looks in `pretrained_dir` first; an official D-FINE file that is absent is downloaded once from the
    GitHub release. DEIM files live on Google Drive: the error says where to get them and where to put them.
    """
    if variant not in ("dfine", "deim"):
        raise ValueError(f"variant must be 'dfine' or 'deim', got {variant!r}")
    path = Path(pretrained_dir) / pretrained_filename(model_name, dataset, variant)
    if path.is_file():
        return path
    release = DFINE_RELEASE_FILES if variant == "dfine" else DEIM_DRIVE_LINKS
    if (model_name, dataset) not in release:
        available = ", ".join(f"{size}/{data}" for size, data in release)
        raise ValueError(
            f"No released {variant} weights for size {model_name!r} on {dataset!r}; available: {available}"
        )
    if variant == "deim":
        raise FileNotFoundError(
            f"DEIM-D-FINE-{model_name.upper()} {dataset} weights not found at {path.resolve()}.\n"
            f"DEIM publishes them on Google Drive: {DEIM_DRIVE_LINKS[(model_name, dataset)]}\n"
            f"Download the file there and save it exactly as {path.resolve()} (see pretrained/README.md)."
        )
    url = DFINE_RELEASE_URL + DFINE_RELEASE_FILES[(model_name, dataset)]
    if download:
        try:
            return _download(url, path)
        except OSError as error:
            reason = f"the download from {url} failed ({error})"
    else:
        reason = "downloading is switched off"
    raise FileNotFoundError(
        f"D-FINE-{model_name.upper()} {dataset} weights not found at {path.resolve()} and {reason}.\n"
        f"Download {url} on a machine with internet and save it exactly as {path.resolve()} "
        "(see pretrained/README.md), or train from scratch (train.pretrained_model_path=null)."
    )


def _download(url: str, path: Path) -> Path:
    logger.info(f"Downloading {url} -> {path}")

    def fetch(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)

    atomic_write(path, fetch)  # a broken download never leaves a half file under the final name
    return path
