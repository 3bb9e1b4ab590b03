"""One inference API for every exported model:

    from src.runtime import load_model
    model = load_model("output/demo/model.onnx")         # .pt | .onnx | .xml | .engine
    dets = model(image_rgb)                              # or model(path), model([img1, img2]), bgr=True
    dets.boxes, dets.scores, dets.labels, dets.names     # xyxy original pixels, thresholds from training

The backend follows the file's suffix; class names, input size, keep_ratio and thresholds come from the
artifact itself. Backends import lazily: a missing library raises BackendUnavailable for that one only.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from src.common.errors import ExperimentError
from src.common.experiment import ARTIFACTS, FILES, Experiment
from src.runtime.backend import BackendUnavailable
from src.runtime.detector import Detections, Detector
from src.runtime.meta import ModelMeta

__all__ = [
    "BackendUnavailable",
    "Detections",
    "Detector",
    "ModelMeta",
    "available_backends",
    "backend_for",
    "best_artifact",
    "ensure_fresh",
    "load_model",
]

# suffix -> (backend name, module, runner class)
_RUNNERS = {
    ".pt": ("torch", "src.runtime.torch_model", "TorchRunner"),
    ".pth": ("torch", "src.runtime.torch_model", "TorchRunner"),
    ".onnx": ("onnx", "src.runtime.onnx_model", "OnnxRunner"),
    ".xml": ("openvino", "src.runtime.openvino_model", "OpenVinoRunner"),
    ".engine": ("tensorrt", "src.runtime.tensorrt_model", "TensorRtRunner"),
}


def backend_for(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _RUNNERS:
        raise ValueError(f"{path}: unknown model file type {suffix!r}; expected one of {sorted(_RUNNERS)}")
    return _RUNNERS[suffix][0]


def load_model(
    path: str | Path, device: str = "auto", precision: str | None = None, conf: float | dict | None = None
) -> Detector:
    """Load any artifact as a Detector.

    device: auto (CUDA when the backend has it, else CPU) | cpu | cuda[:N] | OpenVINO names (GPU, NPU).
    precision: torch fp32|fp16|bf16; OpenVINO inference precision f32|f16|bf16 (always set explicitly:
        OpenVINO would otherwise pick bf16 on CPUs that have it); ONNX/TensorRT run as exported.
        None: the precision export chose for this file (manifest "deployment"), else fp32.
    conf: default threshold(s) for every call (float, or {class name/id: value}); None = the artifact's.
    A folder is accepted too: its best artifact for the device is used (see best_artifact).
    An export inside an experiment folder made from another checkpoint than its current best.pt is refused
    (StaleArtifactError: re-export); a file elsewhere is not checked.
    """
    path = Path(path)
    if path.is_dir():
        path = best_artifact(path, device)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    ensure_fresh(path)
    if precision is None:
        precision = deployed_precision(path)
    backend_for(path)  # raises a clear error for an unknown suffix
    _, module_name, class_name = _RUNNERS[path.suffix.lower()]
    runner_class = getattr(importlib.import_module(module_name), class_name)
    try:
        runner = runner_class(path, device=device, precision=precision)
    except BackendUnavailable:
        raise
    except Exception as err:  # a library's own message often does not say which file it could not read
        if str(path) in str(err):
            raise
        raise type(err)(f"{path}: {err}") if _rebuildable(err) else RuntimeError(f"{path}: {err}") from err
    return Detector(runner, conf=conf)


def _rebuildable(err: Exception) -> bool:
    """Whether err's type can be re-raised with a new message (one str argument)."""
    try:
        type(err)("probe")
    except Exception:
        return False
    return True


def available_backends() -> dict[str, str | None]:
    """backend -> None when usable here, else the reason it is not."""
    checks = {
        "torch": lambda: importlib.import_module("torch"),
        "onnx": lambda: importlib.import_module("onnxruntime"),
        "openvino": lambda: importlib.import_module("openvino"),
        "tensorrt": lambda: importlib.import_module("src.runtime.tensorrt_model").import_tensorrt(),
    }
    status: dict[str, str | None] = {}
    for name, check in checks.items():
        try:
            check()
            status[name] = None
        except BackendUnavailable as err:
            status[name] = err.reason
        except ImportError as err:
            status[name] = f"not installed ({err.name})"
    return status


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
    GPU: TensorRT fp16 > fp32 > ONNX > torch. CPU: OpenVINO fp32 > ONNX > torch (int8 only when chosen).
    """
    folder = Path(folder)
    status = available_backends()
    gpu = device != "cpu" and status["tensorrt"] is None
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
