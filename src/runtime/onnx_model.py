"""ONNX Runtime runner for our exported graphs (postprocessing fused, metadata in metadata_props)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from loguru import logger

from src.common.device import onnx_providers
from src.runtime.backend import BackendUnavailable, Outputs
from src.runtime.meta import INPUT_NAMES, ModelMeta, read_onnx_meta_map


class OnnxRunner:
    backend = "onnx"

    def __init__(self, path: str | Path, device: str = "auto", precision: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendUnavailable(
                "onnx",
                "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)",
            ) from err
        if precision not in (None, "fp32", "f32"):
            logger.warning(
                f"{path}: ONNX graphs run in the precision they were exported in; ignoring {precision}"
            )
        self.path = Path(path)
        try:
            providers = onnx_providers(device, ort.get_available_providers())
        except ValueError as err:
            raise BackendUnavailable("onnx", str(err)) from err
        options = ort.SessionOptions()
        options.log_severity_level = (
            3  # errors only: shape-inference warnings of fused postprocessing are noise
        )
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.meta: ModelMeta = read_onnx_meta_map(self.session.get_modelmeta().custom_metadata_map, self.path)
        names = [i.name for i in self.session.get_inputs()]
        if tuple(names) != INPUT_NAMES:
            raise ValueError(
                f"{self.path}: inputs {names}, expected {list(INPUT_NAMES)} (export with src.dl.export)"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        if tuple(outputs) != self.meta.output_names:
            raise ValueError(
                f"{self.path}: outputs {outputs}, expected {list(self.meta.output_names)} for a "
                f"{self.meta.task} model (export with src.dl.export)"
            )
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.batch_size = batch_dim if isinstance(batch_dim, int) else None  # None: dynamic batch
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        self.precision = self.meta.precision

    def __call__(self, images: np.ndarray, sizes: np.ndarray) -> Outputs:
        return tuple(self.session.run(None, {INPUT_NAMES[0]: images, INPUT_NAMES[1]: sizes}))
