"""Which model file of an experiment the stages run, refusing a stale export; loading it as the stages do.

    detector = load_experiment_model(cfg, model_path, precision, conf)   # infer, check_errors, ...
    detector = load_artifact("output/exp/model.onnx")                     # a file, or the experiment folder

The runtime (src/runtime) loads any one file; this layer knows the experiment folder: its artifact names,
the manifest's export records (an export made from another checkpoint than the current best.pt is refused
with StaleArtifactError: re-export), the deployment export chose (file + runtime precision) and the
slicing settings of the config.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.device import wants_cuda
from src.common.errors import ExperimentError, UserError
from src.common.experiment import ARTIFACTS, FILES, Experiment
from src.etl.tiling import TILES_CSV
from src.runtime import available_backends, backend_for, load_model
from src.runtime.detector import Detector
from src.runtime.slicing import SlicedDetector


def experiment_of(path: str | Path) -> Experiment | None:
    """The experiment folder an artifact lies in (best.pt beside a training config or manifest), else None:
    a folder of the user's holding copied model files is not an experiment and is not checked."""
    folder = Path(path).resolve().parent
    marks = [FILES["config"], FILES["manifest"]]
    if not (folder / ARTIFACTS["torch"]).exists() or not any((folder / m).exists() for m in marks):
        return None
    try:
        return Experiment(folder.parent, folder.name)
    except ExperimentError:  # not a name an experiment could have: a folder of the user's
        return None


def ensure_fresh(path: str | Path) -> Path:
    """StaleArtifactError for an export of an experiment that no longer matches its best.pt."""
    experiment = experiment_of(path)
    return experiment.ensure_fresh(path) if experiment is not None else Path(path)


def deployed_precision(path: str | Path) -> str | None:
    """The runtime precision export chose for this artifact of an experiment (None: not the chosen one)."""
    experiment = experiment_of(path)
    if experiment is None:
        return None
    choice = experiment.deployment()
    if choice.get("artifact") != experiment.artifact_key(path):
        return None
    return choice.get("precision")


def best_artifact(folder: str | Path, device: str = "auto") -> Path:
    """The artifact to run from an experiment folder on the device; a stale one is refused
    (StaleArtifactError), never skipped silently for an older or slower one.

    First the deployment export chose (the fastest that held parity on the device kind it was measured on,
    manifest "deployment"), when its file is present and its backend works. Otherwise the fastest by kind:
    CUDA: TensorRT fp16 > fp32 > ONNX > torch. Otherwise: OpenVINO fp32 > ONNX > torch (int8 only when chosen).
    """
    folder = Path(folder)
    status = available_backends()
    gpu = wants_cuda(device) and status["tensorrt"] is None
    chosen = deployed_artifact(folder, gpu, status)
    if chosen is not None:
        return ensure_fresh(chosen)
    order = ["trt_fp16", "trt_fp32", "onnx", "torch"] if gpu else ["ov_fp32", "onnx", "torch"]
    for key in order:
        candidate = folder / ARTIFACTS[key]
        if candidate.exists() and status[backend_for(candidate)] is None:
            return ensure_fresh(candidate)
    raise FileNotFoundError(
        f"no model artifact in {folder} (looked for {[ARTIFACTS[k] for k in order]}); train or export first"
    )


def deployed_artifact(folder: Path, gpu: bool, status: dict[str, str | None]) -> Path | None:
    """The file of the recorded deployment when it suits this device kind and runs here (else None)."""
    experiment = experiment_of(folder / ARTIFACTS["torch"])
    choice = experiment.deployment() if experiment is not None else {}
    if not choice.get("artifact"):
        return None
    path = folder / ARTIFACTS[choice["artifact"]]
    chosen_on_gpu = str(choice.get("device")) != "cpu" and choice["artifact"].startswith("trt")
    if not path.exists() or status[backend_for(path)] is not None or chosen_on_gpu != gpu:
        return None
    return path


def load_artifact(
    path: str | Path, device: str = "auto", precision: str | None = None, conf: float | dict | None = None
) -> Detector:
    """src.runtime.load_model for a file of an experiment: a folder means its best artifact for the device;
    a stale export is refused (StaleArtifactError); precision None is the one export chose for this file
    (manifest "deployment"), else the backend's fp32. A file outside any experiment is loaded as it is."""
    path = Path(path)
    if path.is_dir():
        path = best_artifact(path, device)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    ensure_fresh(path)
    if precision is None:
        precision = deployed_precision(path)
    return load_model(path, device=device, precision=precision, conf=conf)


def load_experiment_model(
    cfg: DictConfig,
    model_path: str | None = None,
    precision: str | None = None,
    conf: float | dict | None = None,
) -> Detector:
    """A stage's model: `model_path` when given, else the experiment's best artifact for cfg.device; wrapped
    for sliced inference when the config asks for it. Missing files are one line (UserError)."""
    if OmegaConf.is_config(conf):  # {class: threshold} from the command line / config.yaml
        conf = OmegaConf.to_container(conf)
    try:
        path = Path(model_path) if model_path else best_artifact(Experiment.of(cfg).root, str(cfg.device))
        detector = load_artifact(path, device=str(cfg.device), precision=precision, conf=conf)
    except FileNotFoundError as err:  # nothing trained / exported, or a mistyped model_path
        raise UserError(str(err)) from err
    detector = sliced_if_configured(detector, cfg)  # slicing.enabled (auto: trained on tiles)
    logger.info(f"model: {detector}")
    return detector


def trained_on_tiles(data_path: str | Path) -> bool:
    return (Path(data_path) / TILES_CSV).exists()


def slicing_enabled(cfg: DictConfig) -> bool:
    """slicing.enabled true, or auto and the experiment's data set is tiled (cfg.data_path: the experiment's,
    see src/common/experiment.py)."""
    enabled = cfg.slicing.enabled
    return trained_on_tiles(cfg.data_path) if str(enabled) == "auto" else bool(enabled)


def sliced_if_configured(detector: Detector, cfg: DictConfig) -> Detector:
    """The loaded detector, wrapped for sliced inference (src/runtime/slicing.py) when slicing_enabled(cfg)."""
    if not slicing_enabled(cfg):
        return detector
    s = cfg.slicing
    return SlicedDetector(
        detector,
        float(s.overlap),
        bool(s.full_image),
        str(s.match_metric),
        float(s.match_threshold),
        str(s.merge),
        grow_min_score=None if s.grow_min_score is None else float(s.grow_min_score),
    )
