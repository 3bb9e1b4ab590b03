"""OpenVINO runners released in any order leave the main thread's alternate signal stack usable.

Each ov.Core builds its own CPU plugin, and each plugin swaps the thread's signal stack for its own mmap
(unmapped when the plugin goes, the previous one put back only if its own is still current). With a Core per
runner, two runners released in creation order left the stack dangling and pytest died at the next SIGCHLD
(exit 139, no traceback). docs/notes/openvino_signal_stack.md
"""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.runtime.meta import INPUT_NAMES, OUTPUT_NAMES, ModelMeta, write_openvino_meta
from tests.signal_stack import SUPPORTED, dangling_signal_stack

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="sigaltstack and /proc/self/maps: Linux only")
ov = pytest.importorskip("openvino")


def tiny_ir(path: Path) -> Path:
    """An IR with our inputs, outputs and metadata: 3 'detections' from the mean of each channel."""
    from openvino import opset13 as ops

    images = ops.parameter([1, 3, 32, 32], np.float32, name=INPUT_NAMES[0])
    sizes = ops.parameter([1, 2], np.int64, name=INPUT_NAMES[1])
    scores = ops.reduce_mean(images, [2, 3])  # (1, 3)
    boxes = ops.multiply(
        ops.unsqueeze(scores, 2), ops.convert(ops.unsqueeze(sizes, 1), np.float32)
    )  # (1, 3, 2)
    outputs = [ops.convert(scores, np.int64), ops.concat([boxes, boxes], 2), scores]
    for output, name in zip(outputs, OUTPUT_NAMES):
        output.output(0).get_tensor().set_names({name})
    model = ov.Model([o.output(0) for o in outputs], [images, sizes])
    write_openvino_meta(model, ModelMeta(["a", "b", "c"], (32, 32), num_queries=3))
    ov.save_model(model, str(path))
    return path


def test_runners_released_in_creation_order_keep_the_signal_stack_mapped(tmp_path):
    from src.runtime.openvino_model import OpenVinoRunner

    path = tiny_ir(tmp_path / "tiny.xml")
    first, second = OpenVinoRunner(path), OpenVinoRunner(path)
    labels, boxes, scores = second(np.ones((1, 3, 32, 32), np.float32), np.array([[10, 20]], np.int64))
    assert labels.shape == scores.shape == (1, 3) and boxes.shape == (1, 3, 4)
    del first, second  # first in, first out: the order that left the stack dangling
    gc.collect()
    assert dangling_signal_stack() is None


def test_a_child_exit_after_that_is_survived(tmp_path):
    """The crash itself, in a child interpreter: a SIGCHLD handler (torch's DataLoader installs one) and a
    grandchild exiting after two runners were released in creation order."""
    path = tiny_ir(tmp_path / "tiny.xml")
    script = (
        "import gc, signal, subprocess, sys\n"
        "from src.runtime.openvino_model import OpenVinoRunner\n"
        f"first, second = OpenVinoRunner({str(path)!r}), OpenVinoRunner({str(path)!r})\n"
        "del first, second\n"
        "gc.collect()\n"
        "signal.signal(signal.SIGCHLD, lambda *_: None)\n"
        "subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
    )
    from src.common.config import ROOT

    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (
        f"exit {done.returncode} (-{signal.SIGSEGV} is the crash): {done.stderr[-2000:]}"
    )
