"""Our checkpoint format (written and read only here), and reading any accepted checkpoint file.

Ours: `save_run_checkpoint(path, RunCheckpoint)` / `load_run_checkpoint(path)`. best.pt holds the weights to
use; last.pt also everything a resumed run needs (`RunCheckpoint.training`). The dict on disk:
    {"version", "model": state dict, "ema": None | {"module", "updates"}, "meta": ModelSpec.to_meta() +
     thresholds, metrics, epoch, "config": the run's resolved config, + last.pt: optimizer, scheduler, scaler,
     state, epoch, step, rng, partial_losses, wandb_id}
Both load with torch.load(weights_only=True), so either can also be a train.pretrained_model_path.

`read_checkpoint` reads ours, the official training files and bare state dicts alike (EMA weights
preferred); src/models/pretrained.py loads them into a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src.common.io import atomic_torch_save
from src.models.spec import ModelSpec

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
