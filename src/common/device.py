"""The one place the config's `device` (auto | cpu | cuda[:N] | an OpenVINO device name such as GPU or NPU)
becomes what a library takes: a torch device (training, the torch runner, TensorRT's buffers), ONNX Runtime's
providers, or an OpenVINO device name.

torch is imported only by the functions that return a torch device: the ONNX and OpenVINO runners use this
module without torch installed.
"""

from __future__ import annotations

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def wants_cuda(device: str) -> bool:
    """True for 'cuda', 'cuda:N' and 'auto' (auto: use CUDA where the backend has it)."""
    return str(device) == "auto" or str(device).startswith("cuda")


def resolve_device(device: str, local_rank: int = 0):
    """`auto` -> this process's GPU if there is one, else CPU; explicit names are checked, not trusted.

    cuda without an index means this process's GPU (`local_rank` under torchrun). Returns a torch.device.
    """
    import torch

    device = str(device)
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device} was asked for but CUDA is not available here; use device=cpu or auto"
        )
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def cuda_device(device: str, backend: str):
    """The torch CUDA device for a backend that runs on an NVIDIA GPU only (TensorRT): auto and cuda mean
    this process's GPU. ValueError for any device that is not a CUDA GPU (the caller says the backend is
    unavailable)."""
    if not wants_cuda(device):
        raise ValueError(f"{backend} runs on a CUDA GPU only, not device={device}")
    chosen = resolve_device(device)
    if chosen.type != "cuda":
        raise ValueError(f"{backend} needs a CUDA GPU and none is visible (device={device})")
    return chosen


def onnx_providers(device: str, available: list[str]) -> list[str]:
    """ONNX Runtime execution providers for `device`, best first. ValueError when CUDA is asked for by name
    and this onnxruntime has no CUDA provider (auto falls back to the CPU)."""
    if not wants_cuda(device):
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if str(device) != "auto":
        raise ValueError(
            f"device={device} asked, but onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
        )
    return [CPU_PROVIDER]


def openvino_device(device: str) -> str:
    """OpenVINO's device name: auto/cpu/cuda -> CPU (OpenVINO has no CUDA plugin: an NVIDIA machine runs an IR
    on its CPU); GPU, GPU.1, NPU, AUTO pass through in upper case."""
    if str(device) in ("auto", "cpu") or str(device).startswith("cuda"):
        return "CPU"
    return str(device).upper()
