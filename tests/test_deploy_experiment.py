"""Every deployment stage on an experiment outside data/demo, given only exp_name: the data, classes and
model come from the experiment. Also: stale exports refused, use_one_class on 3 classes, infer
outputs kept apart and replaced per input, a bench whose backends all fail keeps the old table."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pandas as pd
import pytest

from src.common.config import ROOT, load_config
from src.common.errors import StaleArtifactError
from src.common.experiment import exp_dir
from tests.helpers.deploy_data import deploy_config, make_checkpoint, make_data

DATA_CLASSES = "{0: circle, 1: square, 2: star}"  # what the demo generator draws (3 classes)
OWN_CLASSES = "{0: disc, 1: block, 2: spike}"  # the experiment's own names for the same ids
OWN_NAMES = {"disc", "block", "spike"}


def trained(root: Path, exp: str, classes: str, *overrides: str):
    """A tiny 'trained' experiment: best.pt + thresholds.json + config.yaml with these classes."""
    cfg = deploy_config(root, f"exp_name={exp}", "~label_to_name", f"+label_to_name={classes}", *overrides)
    make_checkpoint(cfg, {"conf_thresh": 0.3, "f1": 0.0, "per_class": {}})
    return cfg


def later(root: Path, exp: str, *overrides: str):
    """A later stage's config given only the experiment (no data_path, classes or model keys)."""
    return load_config(
        [
            f"output_dir={root / 'output'}",
            f"exp_name={exp}",
            "device=cpu",
            "export.formats=[onnx,openvino]",
            "export.parity_images=4",
            "export.simplify=false",
            "export.ov_fp16=false",
            "bench.warmup=1",
            "bench.save_images=0",
            "check_errors.splits=[val,test]",
            "test_batching.batch_sizes=[1]",
            "test_batching.warmup=0",
            "test_batching.runs=1",
            "ov_int8.subset_size=4",
            "ov_int8.val_images=3",
            *overrides,
        ]
    )


def data(root: Path) -> str:
    """data_path given explicitly (the same as the experiment's): isolates a test from stage_config."""
    return f"data_path={root / 'data'}"


def split_size(root: Path, split: str) -> int:
    return len(pd.read_csv(root / "data" / f"{split}.csv"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """3-class shapes data in <tmp>/data (outside data/demo), split into train/val/test."""
    root = tmp_path_factory.mktemp("own_data")
    make_data(deploy_config(root, "~label_to_name", f"+label_to_name={DATA_CLASSES}"))
    return root


def test_every_later_stage_from_exp_name_only(root):
    from src.dl import bench, check_errors, export, infer, test_batching

    trained(root, "own", OWN_CLASSES)
    report = export.run(later(root, "own"))
    parity = report["parity"]
    splits = ("train", "val", "test")
    assert parity["images"] == min(4, sum(split_size(root, s) for s in splits))  # the experiment's, not noise
    assert parity["onnx"]["ok"] and parity["ov_fp32"]["ok"]

    frame = bench.run(later(root, "own", "bench.backends=[torch,onnx]"))
    assert frame["backend"].tolist() == ["torch", "onnx"]
    assert (frame["images"] == split_size(root, "test")).all()

    summary = infer.run(later(root, "own", "infer.save_crops=false"))  # infer.input = the experiment's data
    assert summary["images"] == len(list((root / "data" / "images").glob("*.jpg")))
    rows = pd.read_csv(Path(summary["out_dir"]) / "predictions.csv")
    assert set(rows["class_name"]) <= OWN_NAMES

    errors = check_errors.run(later(root, "own"))
    assert len(errors) and set(errors["class_name"]) <= OWN_NAMES

    timing = test_batching.run(
        later(root, "own", f"test_batching.model_path={exp_dir(later(root, 'own'))}/best.pt")
    )
    assert timing["status"].tolist() == ["ok"]


def test_one_class_model_on_three_classes(root):
    """use_one_class=true on 3-class data: every ground-truth box is the one class in every stage."""
    from src.dl import bench, check_errors, export, ov_int8

    trained(root, "one", DATA_CLASSES, "model.use_one_class=true")
    parity = export.run(later(root, "one", data(root)))["parity"]
    assert parity["images"] > 0 and all("error" not in parity[k] for k in ("onnx", "ov_fp32"))
    assert parity["onnx"]["ok"]

    frame = bench.run(later(root, "one", data(root), "bench.backends=[torch,ov_fp32]"))
    assert frame["backend"].tolist() == ["torch", "ov_fp32", "ov_fp32@bf16"]  # bf16: measured or why not
    frame = frame[~frame["note"].fillna("").str.startswith("skipped")]
    assert frame[["mAP_50", "f1@tuned", "f1@eval"]].apply(lambda c: c.between(0, 1)).all().all()

    errors = check_errors.run(later(root, "one", data(root)))
    assert set(errors["class_name"]) == {"object"} and set(errors["class_id"]) == {0}

    report = ov_int8.run(later(root, "one", data(root)))
    assert [r["model"] for r in report["results"]] == ["fp32", "int8"]
    assert (exp_dir(later(root, "one", data(root))) / "model_int8.xml").exists()


@pytest.fixture(scope="module")
def exported(root):
    """Experiment "base" exported to ONNX only; tests copy it (copy_experiment) instead of exporting again."""
    from src.dl import export

    cfg = trained(root, "base", OWN_CLASSES, "export.formats=[onnx]", "export.check_parity=false")
    export.run(cfg)
    return exp_dir(cfg)


def copy_experiment(root: Path, folder: Path, exp: str):
    shutil.copytree(folder, root / "output" / exp)
    return deploy_config(root, f"exp_name={exp}", "~label_to_name", f"+label_to_name={OWN_CLASSES}")


def test_stale_export_refused_with_re_export_message(root, exported, tmp_path):
    from src.dl import bench
    from src.dl.artifacts import best_artifact, load_artifact

    cfg = copy_experiment(root, exported, "stale")
    onnx_path = exp_dir(cfg) / "model.onnx"
    elsewhere = tmp_path / "copy" / "model.onnx"
    elsewhere.parent.mkdir()
    shutil.copy(onnx_path, elsewhere)
    assert best_artifact(exp_dir(cfg), "cpu") == onnx_path

    make_checkpoint(cfg, {"conf_thresh": 0.25, "f1": 0.0, "per_class": {}})  # retrained: a new best.pt
    with pytest.raises(StaleArtifactError, match="re-export"):
        load_artifact(onnx_path)
    with pytest.raises(StaleArtifactError, match="re-export"):
        best_artifact(exp_dir(cfg), "cpu")
    with pytest.raises(bench.BenchFailed, match="re-export"):
        bench.run(later(root, "stale", "bench.backends=[onnx]"))
    assert load_artifact(elsewhere).backend == "onnx"  # a file outside the experiment is not checked


def test_bench_with_every_backend_broken_keeps_the_table_and_fails(root, exported):
    from src.dl import bench

    cfg = copy_experiment(root, exported, "broken")
    bench.run(later(root, "broken", data(root), "bench.backends=[onnx]"))
    table = exp_dir(cfg) / "bench.csv"
    before = table.read_bytes()
    (exp_dir(cfg) / "model.onnx").write_bytes(b"not an onnx graph")
    command = [sys.executable, "-m", "src.dl.bench", f"output_dir={root / 'output'}", "exp_name=broken"]
    command += [data(root), "device=cpu", "bench.backends=[onnx]", "bench.warmup=0", "bench.save_images=0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "every backend failed" in output and "model.onnx" in output and "Traceback" not in output
    assert table.read_bytes() == before


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_infer_keeps_same_stem_inputs_apart_and_replaces_only_its_own_outputs(root):
    from src.dl import infer

    cfg = trained(root, "media", OWN_CLASSES)
    pictures = sorted((root / "data" / "images").glob("*.jpg"))
    media, other = root / "media", root / "other"
    (media / "sub").mkdir(parents=True)
    other.mkdir()
    shutil.copy(pictures[0], media / "a.jpg")
    cv2.imwrite(str(media / "a.png"), cv2.imread(str(pictures[1])))
    shutil.copy(pictures[2], media / "sub" / "b.jpg")
    shutil.copy(pictures[3], media / "c.jpg")
    shutil.copy(pictures[4], other / "x.jpg")
    model = f"infer.model_path={exp_dir(cfg) / 'best.pt'}"
    first = infer.run(later(root, "media", f"infer.input={media}", model, "infer.conf=0.0"))
    out = Path(first["out_dir"])
    assert out == exp_dir(cfg) / "infer" / "media"
    labels = sorted(str(p.relative_to(out / "labels")) for p in (out / "labels").rglob("*.txt"))
    assert labels == ["a.jpg.txt", "a.png.txt", "c.txt", "sub/b.txt"]
    assert (out / "images" / "a.jpg").exists() and (out / "images" / "a.png").exists()
    assert {p.name.split("_")[0] for p in (out / "crops").rglob("*.jpg")} >= {"a.jpg", "a.png"}
    assert set(pd.read_csv(out / "predictions.csv")["file"]) == {"a.jpg", "a.png", "sub/b.jpg", "c.jpg"}

    other_out = Path(infer.run(later(root, "media", f"infer.input={other}", model))["out_dir"])
    other_before = file_hashes(other_out)
    (media / "c.jpg").unlink()
    media_before = file_hashes(media)
    again = infer.run(later(root, "media", f"infer.input={media}", model, "infer.conf=0.0"))
    assert Path(again["out_dir"]) == out
    assert not [
        p for p in out.rglob("*") if p.name.startswith(("c.", "c_"))
    ]  # nothing of the earlier run's c.jpg
    assert set(pd.read_csv(out / "predictions.csv")["file"]) == {"a.jpg", "a.png", "sub/b.jpg"}
    assert file_hashes(other_out) == other_before  # another input's outputs untouched
    assert file_hashes(media) == media_before  # the inputs are never written to
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_export_without_split_images_claims_nothing(root, exported, tmp_path):
    """No val (or any split) images: parity and onnxslim are skipped with the reason, never run on noise."""
    from src.dl import export

    copy_experiment(root, exported, "nosplit")
    empty = tmp_path / "no_splits"
    (empty / "images").mkdir(parents=True)
    cfg = later(root, "nosplit", f"data_path={empty}", "export.formats=[onnx]", "export.simplify=true")
    report = export.run(cfg)
    assert str(report["onnx_slimmed"]).startswith("skipped: no split images")
    assert "no split images" in report["parity"]["skipped"]
