"""Broken deployment inputs are one line naming the file, never a traceback: a cut .onnx, a broken .xml, a
cut .bin (the .bin named); and bench on a stale experiment reports the stale export as failed, never as the
chosen deployment."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from src.common.config import ROOT
from src.common.errors import UserError
from src.common.experiment import Experiment, exp_dir
from tests.helpers.deploy_data import deploy_config, exported_experiment, make_checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny experiment exported to ONNX and an OpenVINO fp32 IR (no parity check), and a few images."""

    root = tmp_path_factory.mktemp("failures")
    cfg, _ = exported_experiment(
        root, "export.check_parity=false", "export.simplify=false", "export.ov_fp16=false"
    )
    media = root / "media"
    media.mkdir()
    for image in sorted((root / "data" / "images").glob("*.jpg"))[:2]:
        shutil.copy(image, media / image.name)
    return root, exp_dir(cfg)


def damaged_copy(folder: Path, artifact: str, target: Path, cut: str) -> Path:
    """A copy of an export (an IR with its .bin) with one file cut to half its length."""
    target.mkdir(parents=True, exist_ok=True)
    source = folder / artifact
    copied = Path(shutil.copy(source, target / source.name))
    if source.suffix == ".xml":
        shutil.copy(source.with_suffix(".bin"), copied.with_suffix(".bin"))
    damaged = copied.with_suffix(cut)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    return copied


@pytest.mark.parametrize(
    ("artifact", "cut"),
    [("model.onnx", ".onnx"), ("model_fp32.xml", ".xml"), ("model_fp32.xml", ".bin")],
    ids=["cut onnx", "broken xml", "cut bin"],
)
def test_a_damaged_export_is_one_line_naming_the_file(exported, tmp_path, artifact, cut):
    from src.dl import infer

    root, folder = exported
    model = damaged_copy(folder, artifact, tmp_path / "copy", cut)
    cfg = deploy_config(root, f"infer.input={root / 'media'}", f"infer.model_path={model}")
    with pytest.raises(UserError) as refused:
        infer.run(cfg)
    message = str(refused.value)
    assert message.startswith(str(model.with_suffix(cut))) and "re-export" in message
    assert "\n" not in message


def test_a_cut_bin_exits_2_with_one_line(exported, tmp_path):
    root, folder = exported
    model = damaged_copy(folder, "model_fp32.xml", tmp_path / "copy", ".bin")
    command = [
        sys.executable, "-m", "src.dl.infer", f"output_dir={root / 'output'}", "exp_name=tiny",
        f"data_path={root / 'data'}", "device=cpu", f"infer.input={root / 'media'}", f"infer.model_path={model}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(model.with_suffix(".bin")) in errors[0] and "re-export" in errors[0]
    assert "Traceback" not in done.stderr


def test_bench_on_a_stale_experiment_never_chooses_the_stale_export(exported):
    """The deployment export chose (ONNX here) became stale when best.pt changed: its row says it failed
    and why, and no row is chosen; the checkpoint's row is still measured."""
    from src.dl import bench

    root, folder = exported
    stale = root / "output" / "stale"
    shutil.copytree(folder, stale)
    cfg = deploy_config(root, "bench.backends=[torch,onnx]", "bench.save_images=0")
    cfg.exp_name = "stale"
    Experiment.of(cfg).record_deployment({"name": "onnx", "artifact": "onnx", "reason": "fastest that held"})
    make_checkpoint(cfg, {"conf_thresh": 0.25, "f1": 0.0, "per_class": {}})  # retrained: a new best.pt
    frame = bench.run(cfg).set_index("backend")
    assert frame.loc["onnx", "note"].startswith("failed:") and "re-export" in frame.loc["onnx", "note"]
    assert not frame["chosen"].any()
    assert frame.loc["torch", "images"] > 0
