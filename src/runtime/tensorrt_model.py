"""TensorRT (>= 10) runner for engines built by src.dl.export; metadata in the `<engine>.json` sidecar.

Buffers are torch CUDA tensors (no pycuda dependency). An engine is tied to the GPU model and TensorRT
version it was built with: build it on the machine that runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.common.device import cuda_device
from src.runtime.backend import BackendUnavailable, Outputs
from src.runtime.meta import INPUT_NAMES, ModelMeta, read_sidecar


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailable(
            "tensorrt",
            "tensorrt is not installed (pip install tensorrt on a CUDA machine; see requirements-gpu.txt)",
        ) from err
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("tensorrt", "no CUDA GPU visible to torch")
    return trt


class TensorRtRunner:
    backend = "tensorrt"

    def __init__(self, path: str | Path, device: str = "auto", precision: str | None = None):
        trt = import_tensorrt()
        import torch

        self.path = Path(path)
        self.meta: ModelMeta = read_sidecar(self.path)
        try:
            self.device = cuda_device(device, "TensorRT")
        except ValueError as err:
            raise BackendUnavailable("tensorrt", str(err)) from err
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.engine = trt.Runtime(self.trt_logger).deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise RuntimeError(
                    f"{self.path}: TensorRT could not load the engine (built on another GPU/version?)"
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = self.meta.output_names  # a segment engine has a 4th binding, "masks"
        if sorted(names) != sorted(INPUT_NAMES + self.output_names):
            raise ValueError(
                f"{self.path}: tensors {names}, expected {list(INPUT_NAMES + self.output_names)} "
                f"for a {self.meta.task} model"
            )
        self.dtypes = {
            n: torch.from_numpy(np.zeros(1, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype for n in names
        }
        batch_dim = self.engine.get_tensor_shape(INPUT_NAMES[0])[0]
        if batch_dim == -1:
            self.batch_size = None
            self.max_batch_size = int(self.engine.get_tensor_profile_shape(INPUT_NAMES[0], 0)[2][0])
        else:
            self.batch_size = self.max_batch_size = int(batch_dim)
        self.precision = self.meta.precision
        self.stream = torch.cuda.Stream(self.device)

    def __call__(self, images: np.ndarray, sizes: np.ndarray) -> Outputs:
        import torch

        if len(images) > self.max_batch_size:
            raise ValueError(
                f"{self.path}: batch of {len(images)} > the engine's maximum {self.max_batch_size}"
            )
        inputs = {
            INPUT_NAMES[0]: torch.as_tensor(images, device=self.device, dtype=self.dtypes[INPUT_NAMES[0]]),
            INPUT_NAMES[1]: torch.as_tensor(sizes, device=self.device, dtype=self.dtypes[INPUT_NAMES[1]]),
        }
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for name, tensor in inputs.items():
                tensor = inputs[name] = tensor.contiguous()
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.path}: TensorRT execution failed")
        self.stream.synchronize()
        labels, *rest = (outputs[n].cpu().numpy() for n in self.output_names)  # boxes, scores[, masks]
        return labels.astype(np.int64), *(values.astype(np.float32) for values in rest)
