"""One inference API for every exported model:

    from src.runtime import load_model
    model = load_model("output/demo/model.onnx")         # .pt | .onnx | .xml | .engine
    dets = model(image_rgb)                              # or model(path), model([img1, img2]), bgr=True
    dets.boxes, dets.scores, dets.labels, dets.names     # xyxy original pixels, thresholds from training

The backend follows the file's suffix; class names, input size, keep_ratio and thresholds come from the
artifact itself. Backends import lazily: a missing library raises BackendUnavailable for that one only.

The runtime stands alone: it needs no config, no experiment folder and, for ONNX / OpenVINO files, no
torch. Which file of an experiment to run, and refusing a stale export, is the stages' business
(src/dl/artifacts.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from src.runtime.backend import ArtifactError, BackendUnavailable
from src.runtime.detector import Detections, Detector
from src.runtime.meta import ModelMeta

__all__ = [
    "ArtifactError",
    "BackendUnavailable",
    "Detections",
    "Detector",
    "ModelMeta",
    "available_backends",
    "backend_for",
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
# Errors of our own code, never of a damaged file: they keep their traceback.
_BUGS = (TypeError, AttributeError, NameError, AssertionError)


def backend_for(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _RUNNERS:
        raise ValueError(f"{path}: unknown model file type {suffix!r}; expected one of {sorted(_RUNNERS)}")
    return _RUNNERS[suffix][0]


def load_model(
    path: str | Path, device: str = "auto", precision: str | None = None, conf: float | dict | None = None
) -> Detector:
    """Load one model file as a Detector.

    device: auto (CUDA when the backend has it, else CPU) | cpu | cuda[:N] | OpenVINO names (GPU, NPU);
        src/common/device.py turns it into each library's own.
    precision: torch fp32|fp16|bf16; OpenVINO inference precision f32|f16|bf16 (always set explicitly:
        OpenVINO would otherwise pick bf16 on CPUs that have it); ONNX/TensorRT run as exported. None: fp32.
    conf: default threshold(s) for every call (float, or {class name/id: value}); None = the artifact's.
    A file that cannot be read (cut short, damaged, not made by this project) raises ArtifactError, one
    line naming the file; a backend whose library or hardware is missing raises BackendUnavailable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    backend_for(path)  # raises a clear error for an unknown suffix
    _, module_name, class_name = _RUNNERS[path.suffix.lower()]
    runner_class = getattr(importlib.import_module(module_name), class_name)
    try:
        runner = runner_class(path, device=device, precision=precision)
    except (BackendUnavailable, ArtifactError, *_BUGS):
        raise
    except Exception as err:  # a library's own message often does not say which file it could not read
        raise ArtifactError(path, last_line(err)) from err
    return Detector(runner, conf=conf)


def last_line(err: BaseException) -> str:
    """The informative part of a library's message: OpenVINO's first lines name its own source files."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


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
