"""The runtime stands alone: imported where torch (and the training stack) cannot be imported, it runs an
ONNX export; and device names become each library's own in one place (src/common/device.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from src.common.config import ROOT
from src.common.device import cuda_device, onnx_providers, openvino_device, wants_cuda
from src.common.experiment import exp_dir
from tests.helpers.deploy_data import deploy_config, make_checkpoint

# Run in a fresh interpreter: a meta-path finder refuses every module a standalone service would not have.
WITHOUT_TRAINING_STACK = """
import sys
BLOCKED = ("torch", "torchvision", "hydra", "omegaconf", "pandas", "src.common.config", "src.common.experiment",
           "src.etl", "src.dl", "src.demo", "src.models", "src.metrics")

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is not installed here", name=name)
        return None

sys.meta_path.insert(0, Refuse())
import numpy as np
from src.runtime import available_backends, load_model

detector = load_model(sys.argv[1], device="cpu")
dets = detector(np.full((72, 96, 3), 120, np.uint8), conf=0.0)
assert len(dets) > 0 and dets.boxes.shape == (len(dets), 4), dets
print("backends", available_backends())
print("detections", len(dets), detector.backend)
"""


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    from src.dl import export

    root = tmp_path_factory.mktemp("standalone")
    cfg = deploy_config(root, "export.formats=[onnx]", "export.check_parity=false", "export.simplify=false")
    make_checkpoint(cfg)
    export.run(cfg)
    return exp_dir(cfg) / "model.onnx"


def test_runtime_runs_an_onnx_export_without_torch(onnx_export):
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAINING_STACK, str(onnx_export)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "detections" in done.stdout and "onnx" in done.stdout.splitlines()[-1]
    assert "'torch': 'not installed (torch)'" in done.stdout  # the blocker did hold torch back


def test_device_names_per_library():
    assert wants_cuda("auto") and wants_cuda("cuda:1") and not wants_cuda("cpu") and not wants_cuda("GPU")
    assert onnx_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert onnx_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]  # auto falls back
    assert (
        onnx_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0]
        == "CUDAExecutionProvider"
    )
    with pytest.raises(ValueError, match="no CUDA provider"):
        onnx_providers("cuda:0", ["CPUExecutionProvider"])
    assert [openvino_device(d) for d in ("auto", "cpu", "cuda:0", "gpu.1", "NPU")] == [
        "CPU",
        "CPU",
        "CPU",
        "GPU.1",
        "NPU",
    ]
    with pytest.raises(ValueError, match="CUDA GPU only"):
        cuda_device("cpu", "TensorRT")
