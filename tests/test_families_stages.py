"""Every detector family through every stage, with no family-specific setting: a 2-step training, export
(ONNX + OpenVINO), bench, infer on a folder with a video (tracking) and slicing, check_errors,
test_batching and ov_int8, on a few tiny images the test draws. The stages only go through build(spec)
and the runtime, so a family that breaks one of them breaks it here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from src.common.config import load_config
from src.common.experiment import exp_dir
from tests.helpers.deploy_data import make_video
from tests.helpers.train_data import make_detection_data, train_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# (model.arch, model.name, input side, queries): each family's smallest size, tiny. DETR's stride-32 grid
# must hold its queries (96 px: 9 cells).
FAMILIES = [
    ("dfine", "n", 64, 8),
    ("deim_rtdetrv2", "r18", 64, 8),
    ("rtdetrv2", "r18", 64, 8),
    ("detr", "r50", 96, 8),
]


def family_config(root: Path, arch: str, size: str, side: int, queries: int, *overrides: str):
    data = root / "data"
    return load_config(
        train_overrides(
            root,
            data,
            f"model.arch={arch}",
            f"model.name={size}",
            f"model.img_size=[{side},{side}]",
            f"model.num_queries={queries}",
            "train.use_ema=false",
            "export.formats=[onnx,openvino]",
            "export.int8=false",
            "export.ov_fp16=false",
            "export.simplify=false",
            "export.parity_images=2",
            "export.latency_runs=1",
            "bench.warmup=1",
            "bench.save_images=1",
            "bench.backends=[torch,onnx,ov_fp32]",
            "check_errors.max_images=2",
            "test_batching.batch_sizes=[1,2]",
            "test_batching.warmup=1",
            "test_batching.runs=1",
            "ov_int8.subset_size=2",
            "ov_int8.val_images=2",
            *overrides,
        )
    )


def media_folder(root: Path, data: Path) -> Path:
    """Two of the data's images and a short video, in a folder for infer."""
    media = root / "media"
    media.mkdir()
    for image in sorted((data / "images").glob("*.jpg"))[:2]:
        (media / image.name).write_bytes(image.read_bytes())
    make_video(media / "clip.mp4", frames=4, size=(96, 72), fps=10.0)
    return media


@pytest.mark.parametrize(("arch", "size", "side", "queries"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_a_family_goes_through_every_stage(tmp_path, arch, size, side, queries):
    from src.dl import bench, check_errors, export, infer, ov_int8, test_batching
    from src.dl.train.run import run as train

    make_detection_data(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
    cfg = family_config(tmp_path, arch, size, side, queries)
    train(cfg)
    out = exp_dir(cfg)
    assert (out / "best.pt").is_file()

    exported = export.run(cfg)
    assert (out / "model.onnx").is_file() and (out / "model_fp32.xml").is_file(), exported

    rows = bench.run(cfg)
    assert {"torch", "onnx", "ov_fp32"} <= set(rows["backend"])

    media = media_folder(tmp_path, tmp_path / "data")
    summary = infer.run(
        family_config(
            tmp_path, arch, size, side, queries, f"infer.input={media}", "infer.track=true", "infer.conf=0.0",
            "slicing.enabled=true",
        )
    )  # fmt: skip
    assert summary["images"] == 2 and summary["videos"] == 1 and summary["video_frames"] == 4
    assert (out / "infer" / "media" / "tracks" / "clip.csv").is_file()

    errors = check_errors.run(cfg)
    assert isinstance(errors, pd.DataFrame)

    batching = test_batching.run(cfg)
    assert len(batching) >= 1

    quantized = ov_int8.run(cfg)
    assert (out / "model_int8.xml").is_file(), quantized
