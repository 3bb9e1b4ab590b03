"""PyTorch runner for the trainer's checkpoints (best.pt / last.pt: weights + "meta"), and DeployModel:
the model with its postprocessing fused, which is also exactly what src.dl.export traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import nn

from src.common.device import resolve_device
from src.common.hardware import resolve_threads
from src.models import build, spec_from_checkpoint
from src.models.checkpoint import read_checkpoint
from src.runtime.backend import Outputs
from src.runtime.meta import SEGMENT_OUTPUT_NAMES, THRESHOLDS_FILE, ModelMeta, meta_from_checkpoint

TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
TORCH_CHUNK = 8


class DeployModel(nn.Module):
    """images (B, 3, h, w) float in [0, 1] + orig_target_sizes (B, 2) (w, h)
    -> labels (B, K) int64, boxes (B, K, 4) xyxy pixels of the target sizes, scores (B, K)
    [, masks (B, K, h/s, w/s) mask logits of the kept queries: a segment model's 4th output]."""

    def __init__(self, model: nn.Module, postprocessor: nn.Module):
        super().__init__()
        self.model = model.deploy() if hasattr(model, "deploy") else model.eval()
        self.postprocessor = (
            postprocessor.deploy() if hasattr(postprocessor, "deploy") else postprocessor.eval()
        )

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor):
        outputs = self.model(images)
        result = self.postprocessor(outputs, orig_target_sizes)
        if isinstance(result, (list, tuple)) and result and isinstance(result[0], dict):  # not in deploy mode
            keys = [key for key in SEGMENT_OUTPUT_NAMES if key in result[0]]
            return tuple(torch.stack([r[key] for r in result]) for key in keys)
        return result


def read_project_checkpoint(path: str | Path):
    """src.models.checkpoint.read_checkpoint (EMA preferred), insisting on our "meta" (classes, input size)."""
    checkpoint = read_checkpoint(path)
    if not checkpoint.meta.get("class_names") and "num_classes" not in checkpoint.meta:
        raise ValueError(
            f"{path}: not a checkpoint of this project (no 'meta' with classes and input size); "
            "official D-FINE weights are used via train.pretrained_model_path, not for inference"
        )
    return checkpoint


def checkpoint_meta(path: str | Path, meta: dict[str, Any]) -> ModelMeta:
    """The checkpoint's ModelMeta; thresholds.json beside it (written after training) takes precedence."""
    thresholds_file = Path(path).with_name(THRESHOLDS_FILE)
    thresholds = json.loads(thresholds_file.read_text(encoding="utf-8")) if thresholds_file.exists() else None
    return meta_from_checkpoint(meta, thresholds)


def build_deploy_model(path: str | Path) -> tuple[DeployModel, ModelMeta]:
    """(fused eval model on CPU, fp32; its metadata) from one of our checkpoints."""
    checkpoint = read_project_checkpoint(path)
    meta = checkpoint_meta(path, checkpoint.meta)
    # the trainer's own build; the architecture read off the weights (fine-tuned from released files)
    spec = spec_from_checkpoint(checkpoint.meta, checkpoint.state)
    model, _, postprocessor = build(spec)
    try:
        model.load_state_dict(checkpoint.state)  # strict: our own checkpoint must match its architecture
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit {spec.display_name}: {err}") from err
    return DeployModel(model, postprocessor).eval(), meta


def limit_threads_to_free_cpus() -> None:
    """Lower torch's intra-op threads to the CPUs the machine's load leaves free (never raises them): threads
    waiting for a busy core slow every image down far more than one thread fewer does."""
    free, why = resolve_threads(None, num_workers=0)  # None: OMP_NUM_THREADS is set, the user's choice
    if free is not None and free < torch.get_num_threads():
        logger.info(f"torch inference: {free} thread(s) instead of {torch.get_num_threads()} ({why})")
        torch.set_num_threads(free)


class TorchRunner:
    backend = "torch"

    def __init__(self, path: str | Path, device: str = "auto", precision: str | None = None):
        self.path = Path(path)
        self.precision = precision or "fp32"
        if self.precision not in TORCH_PRECISIONS:
            raise ValueError(f"torch precision must be one of {TORCH_PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        if self.precision == "fp16" and self.device.type == "cpu":
            logger.warning(
                "fp16 is slow or unsupported on CPU; running fp32 (use bf16 for reduced precision)"
            )
            self.precision = "fp32"
        if self.device.type == "cpu":
            limit_threads_to_free_cpus()
        model, self.meta = build_deploy_model(self.path)
        self.model = model.to(self.device)
        if self.precision == "fp16":
            self.model.half()
        self.batch_size = None  # dynamic
        self.max_batch_size = TORCH_CHUNK  # default chunk for lists; any batch size runs

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, sizes: np.ndarray) -> Outputs:
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        x = torch.from_numpy(images).to(self.device, dtype, non_blocking=True)
        target = torch.from_numpy(sizes).to(self.device)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            labels, boxes, scores, *masks = self.model(x, target)  # masks: [(B, K, h, w)] for segment
        return (
            labels.cpu().numpy().astype(np.int64),
            *(values.float().cpu().numpy() for values in (boxes, scores, *masks)),
        )

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
