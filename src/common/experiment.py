"""The one owner of `output/<exp_name>/`: its name, every file name in it, and its manifest.

    exp = Experiment.of(cfg)                  # validates exp_name (a plain folder name)
    exp.file("best")                          # output/<exp>/best.pt (every name lives in FILES / ARTIFACTS)
    exp.artifact("onnx")                      # output/<exp>/model.onnx
    exp.record_training(cfg)                  # manifest "made_from": data, split hashes, classes, model
    exp.record_export("onnx")                 # manifest "made_into": the best.pt hash it came from
    exp.ensure_fresh(path)                    # StaleArtifactError when an export predates best.pt
    cfg = stage_config(cfg)                   # later stages: data, classes and model from the experiment

The manifest (`manifest.json`) says what the run was made from and what was made from it. Writes are
atomic; the folder of a previous run is moved aside (never deleted) by `move_aside`, and `restore` puts
it back when the new run fails before its first checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.config import default_config
from src.common.errors import ConfigError, ExperimentError, StaleArtifactError
from src.common.io import atomic_write_json, read_json

LAYOUT_VERSION = 2

# What training writes (key -> name). train.overwrite moves the whole folder aside, exports included.
FILES = {
    "config": "config.yaml",
    "manifest": "manifest.json",
    "log": "train_log.txt",
    "history": "history.csv",
    "curves": "curves.png",
    "tensorboard": "tensorboard",
    "last": "last.pt",
    "best": "best.pt",
    "metrics": "metrics.csv",
    "per_class": "per_class.csv",
    "thresholds": "thresholds.json",
    "plots": "plots",
    "debug_images": "debug_images",
    "eval_preds": "eval_preds",
    "negatives_metrics": "negatives_metrics.json",
    # deployment
    "export_report": "export_report.json",
    "bench": "bench.csv",
    "bench_images": "bench",
    "infer": "infer",
    "check_errors": "check_errors",
    "test_batching": "test_batching.csv",
    "ov_int8_report": "ov_int8_report.json",
}

# Model artifacts by variant: what export (and ov_int8) writes, and what runtime.load picks from.
ARTIFACTS = {
    "torch": "best.pt",
    "onnx": "model.onnx",
    "ov_fp32": "model_fp32.xml",
    "ov_fp16": "model_fp16.xml",
    "ov_int8": "model_int8.xml",
    "trt_fp16": "model_fp16.engine",
    "trt_fp32": "model_fp32.engine",
    "trt_int8": "model_int8.engine",
}

# Keys that define the trained model: a later stage takes them from the experiment and refuses a change.
MODEL_KEYS = ("model", "label_to_name")
# Keys a later stage may change safely (evaluate on another data set): allowed and logged.
DATA_KEYS = ("data_path", "splits_dir")


def validate_exp_name(name: object) -> str:
    """exp_name must be a plain folder name: no separators, not `.` or `..`, not empty."""
    text = "" if name is None else str(name)
    bad = (
        not text.strip()
        or text in (".", "..")
        or "/" in text
        or "\\" in text
        or os.sep in text
        or text != text.strip()
        or text.startswith("~")
        or "\0" in text
    )
    if bad:
        raise ExperimentError(
            f"exp_name={text!r} is not a plain folder name (not empty, '.' or '..'; no '/', '\\', leading '~' or "
            "surrounding spaces): experiments live in output_dir/<exp_name>/"
        )
    return text


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Experiment:
    """One experiment folder. Construct with `Experiment.of(cfg)` or `Experiment(output_dir, name)`."""

    def __init__(self, output_dir: str | Path, name: object) -> None:
        self.name = validate_exp_name(name)
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / self.name

    @classmethod
    def of(cls, cfg: DictConfig) -> Experiment:
        return cls(cfg.output_dir, cfg.exp_name)

    def __repr__(self) -> str:
        return f"Experiment({str(self.root)!r})"

    # ------------------------------------------------------------------ names

    def file(self, key: str) -> Path:
        if key not in FILES:
            raise KeyError(f"unknown experiment file {key!r}; known: {sorted(FILES)}")
        return self.root / FILES[key]

    def artifact(self, key: str) -> Path:
        if key not in ARTIFACTS:
            raise KeyError(f"unknown artifact {key!r}; known: {sorted(ARTIFACTS)}")
        return self.root / ARTIFACTS[key]

    def artifact_key(self, path: str | Path) -> str | None:
        """The ARTIFACTS key of a path inside this folder (None for a file elsewhere or unknown)."""
        path = Path(path)
        if path.resolve().parent != self.root.resolve():
            return None
        return next((key for key, name in ARTIFACTS.items() if name == path.name), None)

    def has_checkpoint(self) -> bool:
        return self.file("last").exists() or self.file("best").exists()

    def holds_anything(self) -> bool:
        return self.root.is_dir() and any(self.root.iterdir())

    # ------------------------------------------------------------------ manifest

    def manifest(self) -> dict:
        path = self.file("manifest")
        return read_json(path) if path.exists() else {}

    def _write_manifest(self, manifest: dict) -> None:
        manifest["layout_version"] = LAYOUT_VERSION
        manifest["exp_name"] = self.name
        atomic_write_json(self.file("manifest"), manifest)

    def record_training(self, cfg: DictConfig, split_files: dict[str, Path] | None = None) -> dict:
        """Write "made_from": data_path, split files with their hashes, classes, model settings."""
        splits = {}
        for split, path in (split_files or {}).items():
            path = Path(path)
            if path.exists():
                splits[split] = {"file": str(path), "sha256": file_sha256(path)}
        made_from = {
            "data_path": str(cfg.data_path),
            "splits_dir": str(cfg.splits_dir),
            "splits": splits,
            "label_to_name": {int(k): str(v) for k, v in cfg.label_to_name.items()},
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "img_size": [int(v) for v in cfg.model.img_size],
            "pretrained_model_path": OmegaConf.select(cfg, "train.pretrained_model_path"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        manifest = self.manifest()
        manifest["made_from"] = made_from
        manifest["made_into"] = {}  # a new run: earlier exports belong to the folder moved aside
        self._write_manifest(manifest)
        return made_from

    def checkpoint_sha256(self) -> str | None:
        best = self.file("best")
        return file_sha256(best) if best.exists() else None

    def record_export(self, key: str, checkpoint_sha256: str | None = None, **extra) -> dict:
        """Note in "made_into" that artifact `key` was made from the current best.pt (or the given hash)."""
        path = self.artifact(key)
        entry = {
            "file": path.name,
            "checkpoint_sha256": checkpoint_sha256 or self.checkpoint_sha256(),
            "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        manifest = self.manifest()
        manifest.setdefault("made_into", {})[key] = entry
        self._write_manifest(manifest)
        return entry

    def record_deployment(self, choice: dict) -> None:
        """Note the deployment export chose for this machine (artifact key, runtime precision, reason)."""
        manifest = self.manifest()
        manifest["deployment"] = {**choice, "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write_manifest(manifest)

    def deployment(self) -> dict:
        """The recorded deployment choice ({} when export has not chosen one)."""
        return self.manifest().get("deployment") or {}

    def stale_reason(self, path: str | Path) -> str | None:
        """Why an artifact of this folder must not be used as the experiment's model (None: it is fresh)."""
        key = self.artifact_key(path)
        if key is None or key == "torch":
            return None
        best = self.file("best")
        if not best.exists():
            return None  # nothing to compare with (an export copied in by hand)
        record = self.manifest().get("made_into", {}).get(key)
        if record is None:
            if Path(path).stat().st_mtime < best.stat().st_mtime:
                return f"{Path(path).name} is older than best.pt and has no export record"
            return None
        if record.get("checkpoint_sha256") != self.checkpoint_sha256():
            return f"{Path(path).name} was exported from another checkpoint than the current best.pt"
        return None

    def ensure_fresh(self, path: str | Path) -> Path:
        reason = self.stale_reason(path)
        if reason:
            raise StaleArtifactError(
                f'{self.root}: {reason}; re-export with `make export ARGS="exp_name={self.name}"`'
            )
        return Path(path)

    # ------------------------------------------------------------------ overwrite without loss

    def move_aside(self) -> Path:
        """Rename the folder to <exp>.replaced-<time> beside it (kept, never deleted) and return that path."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = self.output_dir / f"{self.name}.replaced-{stamp}"
        n = 1
        while backup.exists():
            n += 1
            backup = self.output_dir / f"{self.name}.replaced-{stamp}-{n}"
        os.replace(self.root, backup)
        return backup

    def restore(self, backup: Path) -> None:
        """Put a moved-aside folder back (the failed run's own files are removed first: it has no model)."""
        if self.root.exists():
            if self.has_checkpoint():
                raise ExperimentError(f"{self.root} holds a checkpoint: not restoring {backup} over it")
            shutil.rmtree(self.root)
        os.replace(backup, self.root)


def exp_dir(cfg: DictConfig) -> Path:
    """output_dir/exp_name, exp_name checked to be a plain folder name."""
    return Experiment.of(cfg).root


# ---------------------------------------------------------------------------------------------- stage config


def _leaves(node: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}, "c": 2} -> {"a.b": 1, "c": 2}."""
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_plain(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def stage_config(cfg: DictConfig, defaults: DictConfig | None = None) -> DictConfig:
    """cfg for a stage after training: model settings, classes and data from the experiment.

    A key left at config.yaml's default takes the experiment's value silently. A model-defining key given
    with another value is refused (ConfigError naming the key and both values). data_path/splits_dir given
    with another value are allowed (evaluating on another data set) and logged.
    """
    exp = Experiment.of(cfg)
    saved_path = exp.file("config")
    if not saved_path.exists():
        return cfg
    saved = OmegaConf.load(saved_path)
    defaults = defaults if defaults is not None else default_config()
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)
    for key in MODEL_KEYS:
        now, then, default = (_as_plain(c, key) for c in (cfg, saved, defaults))
        if key == "label_to_name":
            now, then, default = ({str(k): v for k, v in (d or {}).items()} for d in (now, then, default))
        if now == then:
            continue
        now_leaves, then_leaves, default_leaves = (_leaves(d) for d in (now or {}, then or {}, default or {}))
        for leaf in sorted(set(now_leaves) | set(then_leaves)):
            a, b = now_leaves.get(leaf), then_leaves.get(leaf)
            if a != b and a != default_leaves.get(leaf):
                raise ConfigError(
                    f"{key}.{leaf}={a} would change the model of experiment {exp.name!r}, trained with "
                    f"{key}.{leaf}={b}: drop the override, or train a new experiment"
                )
        merged[key] = saved[key]
    _take_data_keys(cfg, saved, defaults, merged, exp.name)
    return merged


def _take_data_keys(cfg, saved, defaults, merged, name: str) -> None:
    now_data, then_data = str(cfg.data_path), str(saved.get("data_path", cfg.data_path))
    if now_data != then_data and now_data != str(defaults.data_path):
        logger.info(
            f"data_path={now_data}: evaluating experiment {name!r} on another data set "
            f"(it was trained on {then_data})"
        )
        return
    merged.data_path = then_data
    now_splits, then_splits = str(cfg.splits_dir), str(saved.get("splits_dir", then_data))
    default_splits = str(defaults.splits_dir)
    if now_splits not in (then_splits, default_splits, now_data):
        logger.info(f"splits_dir={now_splits}: using these splits, not the experiment's {then_splits}")
        return
    merged.splits_dir = then_splits
