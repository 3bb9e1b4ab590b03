"""OpenVINO runner for our IR files (postprocessing fused, metadata in rt_info).

The inference precision is always set explicitly (INFERENCE_PRECISION_HINT): OpenVINO otherwise picks
bf16 on CPUs that have it (and f16 on GPUs), which changes accuracy silently.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from loguru import logger

from src.common.device import openvino_device
from src.runtime.backend import ArtifactError, BackendUnavailable, Outputs
from src.runtime.meta import INPUT_NAMES, ModelMeta, read_openvino_meta

# our names -> OpenVINO's element type names for INFERENCE_PRECISION_HINT
PRECISIONS = {"f32": "f32", "fp32": "f32", "f16": "f16", "fp16": "f16", "bf16": "bf16"}
# INFERENCE_PRECISION_HINT -> the OPTIMIZATION_CAPABILITIES entry a device reports when it runs it natively
# (the CPU plugin reports BF16 only with AVX512-BF16 or AMX, FP16 only with AVX512-FP16 / AMX-FP16)
CAPABILITY = {"f32": "FP32", "f16": "FP16", "bf16": "BF16"}


def device_capabilities(device: str) -> set[str]:
    """What OpenVINO says `device` runs natively (FP32, BF16, FP16, INT8...)."""
    return set(shared_core().get_property(openvino_device(device), "OPTIMIZATION_CAPABILITIES"))


def precision_unavailable(precision: str, device: str = "cpu") -> str | None:
    """Why OpenVINO cannot run `precision` natively on `device` (None: it can). An emulated bf16/f16 is
    slower than f32 and OpenVINO would quietly run f32 instead: both are refusals, with the reason."""
    needed = CAPABILITY[PRECISIONS[precision]]
    found = device_capabilities(device)
    if needed in found:
        return None
    return (
        f"OpenVINO {openvino_device(device)} has no native {needed} (it reports {', '.join(sorted(found))})"
    )


@cache
def shared_core():
    """The process's one ov.Core. Each Core builds its own CPU plugin, and each plugin swaps the calling
    thread's alternate signal stack for a fresh mmap, unmapped again when the plugin goes; plugins released in
    creation order leave that thread on an unmapped stack, and the next signal it handles (a child's SIGCHLD,
    Ctrl+C) kills the process with no traceback (exit 139). docs/notes/openvino_signal_stack.md"""
    import openvino as ov

    return ov.Core()


class OpenVinoRunner:
    backend = "openvino"

    def __init__(self, path: str | Path, device: str = "auto", precision: str | None = None):
        try:
            core = shared_core()
        except ImportError as err:
            raise BackendUnavailable("openvino", "openvino is not installed: pip install openvino") from err
        self.path = Path(path)
        precision = precision or "f32"
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of f32|f16|bf16, got {precision!r}")
        check_weights_file(self.path)
        model = core.read_model(str(self.path))
        self.meta: ModelMeta = read_openvino_meta(model, self.path)
        # A port may carry several tensor names (OpenVINO merges names when it folds a no-op Cast).
        names = [port.get_names() for port in model.inputs]
        if len(names) != len(INPUT_NAMES) or any(n not in found for n, found in zip(INPUT_NAMES, names)):
            raise ValueError(
                f"{self.path}: inputs {names}, expected {list(INPUT_NAMES)} (export with src.dl.export)"
            )
        batch_dim = model.inputs[0].get_partial_shape()[0]
        self.batch_size = batch_dim.get_length() if batch_dim.is_static else None
        self.device = openvino_device(device)
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        self._use(core.compile_model(model, self.device, config))
        if self.precision != PRECISIONS[precision]:
            logger.warning(
                f"{self.path}: asked for {precision}, OpenVINO runs {self.precision} on {self.device}"
            )

    @classmethod
    def from_compiled(cls, compiled, meta: ModelMeta, path: str | Path = "<in memory>") -> OpenVinoRunner:
        """Wrap an already compiled model (what NNCF hands to a validation function)."""
        runner = cls.__new__(cls)
        runner.path, runner.meta, runner.device = Path(path), meta, "CPU"
        batch_dim = compiled.inputs[0].get_partial_shape()[0]
        runner.batch_size = batch_dim.get_length() if batch_dim.is_static else None
        runner._use(compiled)
        return runner

    def _use(self, compiled) -> None:
        self.compiled = compiled
        self.precision = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.request = compiled.create_infer_request()
        try:
            self.output_ports = [compiled.output(name) for name in self.meta.output_names]
        except RuntimeError as err:  # OpenVINO's message for a missing name is long; say what is expected
            raise ValueError(
                f"{self.path}: expected outputs {list(self.meta.output_names)} for a {self.meta.task} model "
                f"(export with src.dl.export): {str(err).splitlines()[0]}"
            ) from err

    def __call__(self, images: np.ndarray, sizes: np.ndarray) -> Outputs:
        result = self.request.infer({INPUT_NAMES[0]: images, INPUT_NAMES[1]: sizes})
        labels, *rest = (np.array(result[port]) for port in self.output_ports)  # rest: boxes, scores[, masks]
        return labels.astype(np.int64), *rest


# Every constant of an IR's .xml points into its .bin: <data ... offset="N" size="M" />
WEIGHTS_RANGE = re.compile(r'offset="(\d+)"\s+size="(\d+)"')


def check_weights_file(xml_path: Path) -> None:
    """ArtifactError naming the .bin when it is missing or shorter than the graph's constants need (a copy
    or download cut short): OpenVINO's own message names neither file."""
    bin_path = xml_path.with_suffix(".bin")
    if not bin_path.is_file():
        raise ArtifactError(bin_path, f"the weights of {xml_path.name} are missing")
    ranges = WEIGHTS_RANGE.findall(xml_path.read_text(encoding="utf-8", errors="replace"))
    needed = max((int(offset) + int(size) for offset, size in ranges), default=0)
    found = bin_path.stat().st_size
    if found < needed:
        raise ArtifactError(bin_path, f"{found} bytes, {xml_path.name} needs {needed}: the file is cut short")


def _type_name(value) -> str:
    return value.to_string() if hasattr(value, "to_string") else str(value)


def save_ir(model, path: str | Path, compress_to_fp16: bool) -> Path:
    """Write an OpenVINO IR (path.xml + path.bin) replacing an existing pair as a pair.

    Both files are written into a temp folder beside `path` first (a failure leaves the old pair intact).
    Then the old .xml is moved out of the way before the new .bin lands, and the new .xml comes last, so a
    reader finds the old pair, no .xml at all (a clear "not found"), or the new pair: never an .xml beside
    a .bin of another model.
    """
    import openvino as ov

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent))
    try:
        new_xml = staging / path.name
        ov.save_model(model, str(new_xml), compress_to_fp16=compress_to_fp16)
        if path.exists():
            os.replace(path, staging / f"old{path.suffix}")
        os.replace(new_xml.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(new_xml, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
