"""The OpenVINO .xml/.bin pair replaced as a pair, and the one video reader/writer (src/common/video.py)."""

from __future__ import annotations

import numpy as np
import pytest

from src.common.video import VideoOutput, VideoReadError, open_video


def tiny_ir(value: float):
    """An OpenVINO model x (1, 3) -> x + value."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 3], np.float32, name="x")
    return ov.Model([ops.add(x, ops.constant(np.full((1, 3), value, np.float32)))], [x], "tiny")


def run_ir(path) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU")
    return np.asarray(compiled({"x": np.zeros((1, 3), np.float32)})[compiled.output(0)])


def test_openvino_pair_replaced_as_a_pair(tmp_path, monkeypatch):
    import openvino as ov

    from src.runtime.openvino_model import save_ir

    path = tmp_path / "model_fp32.xml"
    save_ir(tiny_ir(1.0), path, compress_to_fp16=False)
    save_ir(tiny_ir(2.0), path, compress_to_fp16=False)
    assert run_ir(path).tolist() == [[2.0, 2.0, 2.0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_fp32.bin", "model_fp32.xml"]

    def failing_save(model, out, compress_to_fp16):  # a crash while writing the new pair
        raise RuntimeError("disk full")

    monkeypatch.setattr(ov, "save_model", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_ir(tiny_ir(3.0), path, compress_to_fp16=False)
    assert run_ir(path).tolist() == [[2.0, 2.0, 2.0]]  # the old pair, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_fp32.bin", "model_fp32.xml"]


def test_video_written_and_read_back(tmp_path):
    out = tmp_path / "videos" / "clip.mp4"
    writer = VideoOutput([(out, "mp4v")], fps=12.0, size=(64, 48))
    for i in range(6):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    assert not out.exists()  # only the temp file until finish()
    writer.finish()
    with open_video(out) as video:
        assert (video.fps, video.size, video.total) == (pytest.approx(12.0), (64, 48), 6)
        frames = list(video.frames(cap=4))
    assert [i for i, _ in frames] == [0, 1, 2, 3] and frames[0][1].shape == (48, 64, 3)

    aborted = tmp_path / "videos" / "aborted.mp4"
    writer = VideoOutput([(aborted, "mp4v")], fps=12.0, size=(64, 48))
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.abort()
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.mp4"]  # no half video left


def test_unreadable_video_named(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(VideoReadError, match="broken.mp4"):
        open_video(broken)
