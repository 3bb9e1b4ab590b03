"""The experiment folder in training (src/dl/train/run.py with src/common/experiment.py): exp_name checked
before anything is written, overwrite that never loses a model, retries after a failed start, resume of a
finished run, the manifest. Real D-FINE-n runs on tiny synthetic data (tests/test_train.py's), 1 step each."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.common.errors import ExperimentError
from tests.helpers.train_data import CLASSES, make_detection_data, train_config, train_overrides

TINY = ("train.max_steps_per_epoch=1", "train.debug_images=1", "train.eval_images=1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_detection_data(tmp_path_factory.mktemp("data"), {"train": 4, "val": 2, "test": 1})


def _run(cfg) -> dict:
    from src.dl.train import run

    return run(cfg)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """A finished one-epoch run (copied by the tests that change it)."""
    tmp = tmp_path_factory.mktemp("finished")
    return Path(_run(train_config(tmp, data_dir, *TINY))["exp_dir"])


def _copy_run(folder: Path, tmp_path: Path) -> Path:
    """The finished run as output/run in tmp_path (what train_config points at)."""
    target = tmp_path / "output" / "run"
    shutil.copytree(folder, target)
    return target


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------- exp_name


@pytest.mark.parametrize("name", ["..", ".", "", "a/../../x", "nested/run", "ABSOLUTE"])
def test_bad_exp_names_are_refused_before_anything_is_written(tmp_path, data_dir, name):
    before = _tree(tmp_path), _tree(data_dir)
    cfg = train_config(tmp_path, data_dir, *TINY)
    cfg.exp_name = str(tmp_path / "abs_run") if name == "ABSOLUTE" else name
    with pytest.raises(ExperimentError, match="exp_name"):
        _run(cfg)
    assert (_tree(tmp_path), _tree(data_dir)) == before  # no output/, no data_report, no config.yaml


def test_the_cli_refuses_a_bad_exp_name_in_one_line(tmp_path, data_dir):
    from src.common.config import ROOT

    command = [sys.executable, "-m", "src.dl.train", *train_overrides(tmp_path, data_dir, "exp_name=..")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "exp_name='..'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "output").exists()


# ---------------------------------------------------------------------------------------------- overwrite


def test_overwrite_with_a_bad_data_path_keeps_the_old_run_byte_for_byte(tmp_path, finished):
    folder = _copy_run(finished, tmp_path)
    old = {p: (folder / p).read_bytes() for p in ("best.pt", "last.pt", "config.yaml", "manifest.json")}
    cfg = train_config(tmp_path, tmp_path / "no_such_data", "train.overwrite=true", *TINY)
    with pytest.raises(Exception):  # noqa: B017 - whatever the data check raises; the point is what is left
        _run(cfg)
    assert {p: (folder / p).read_bytes() for p in old} == old
    assert not list(folder.parent.glob("run.replaced-*"))


def test_overwrite_without_the_flag_is_refused_and_touches_nothing(tmp_path, data_dir, finished):
    folder = _copy_run(finished, tmp_path)
    before = _tree(folder)
    with pytest.raises(ExperimentError, match="train.overwrite=true"):
        _run(train_config(tmp_path, data_dir, *TINY))
    assert _tree(folder) == before


def test_a_good_overwrite_moves_the_old_run_aside(tmp_path, data_dir, finished):
    folder = _copy_run(finished, tmp_path)
    old_best = (folder / "best.pt").read_bytes()
    (folder / "model.onnx").write_text("an export of the old run")
    _run(train_config(tmp_path, data_dir, "train.overwrite=true", "seed=7", *TINY))
    [aside] = folder.parent.glob("run.replaced-*")
    assert (aside / "best.pt").read_bytes() == old_best and (aside / "model.onnx").exists()
    assert (folder / "best.pt").read_bytes() != old_best and not (folder / "model.onnx").exists()
    assert f"the previous run is kept in {aside}" in (folder / "train_log.txt").read_text()


def test_an_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(
    tmp_path, data_dir, finished
):
    from src.dl.train import TrainingAborted

    folder = _copy_run(finished, tmp_path)
    before = {p: (folder / p).read_bytes() for p in ("best.pt", "last.pt", "train_log.txt")}
    cfg = train_config(tmp_path, data_dir, "train.overwrite=true", "train.abort_after_steps=1", *TINY)
    with pytest.raises(TrainingAborted):
        _run(cfg)
    assert {p: (folder / p).read_bytes() for p in before} == before
    assert not list(folder.parent.glob("run.replaced-*"))


# ---------------------------------------------------------------------------------------------- retry, resume


def test_a_run_that_failed_before_any_checkpoint_does_not_block_the_retry(tmp_path, data_dir):
    from src.dl.train import TrainingAborted

    with pytest.raises(TrainingAborted):
        _run(train_config(tmp_path, data_dir, "train.abort_after_steps=1", *TINY))
    folder = tmp_path / "output" / "run"
    assert (folder / "config.yaml").exists() and not (folder / "last.pt").exists()
    summary = _run(train_config(tmp_path, data_dir, *TINY))  # no train.overwrite needed
    assert Path(summary["exp_dir"], "best.pt").is_file()
    assert not list(folder.parent.glob("run.replaced-*"))
    assert "ended before any checkpoint" in (folder / "train_log.txt").read_text()


def test_resume_needs_a_last_checkpoint(tmp_path, data_dir):
    with pytest.raises(ExperimentError, match="last.pt"):
        _run(train_config(tmp_path, data_dir, "exp_name=never", "train.resume=true"))
    assert not (tmp_path / "output" / "never").exists()


def test_resume_of_a_finished_run_does_no_work(tmp_path, data_dir, finished):
    folder = _copy_run(finished, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    summary = _run(train_config(tmp_path, data_dir, "train.resume=true", *TINY))
    assert summary["finished"] and summary["epochs_trained"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing re-evaluated


def test_resume_completes_a_config_saved_before_newer_keys_existed(tmp_path, data_dir):
    from src.dl.train import TrainingAborted

    common = ("train.epochs=2", "train.checkpoint_every_steps=1", *TINY, "train.max_steps_per_epoch=2")
    with pytest.raises(TrainingAborted):
        _run(train_config(tmp_path, data_dir, "train.abort_after_steps=1", *common))
    last = tmp_path / "output" / "run" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    for group, key in (("train", "dn_negatives"), ("train", "negatives_thresholds"), ("train", "cls_loss"),
                       ("train", "fppi_tolerance"), ("train", "flat_cosine"), ("model", "use_one_class")):  # fmt: skip
        del checkpoint["config"][group][key]
    torch.save(checkpoint, last)
    summary = _run(train_config(tmp_path, data_dir, "train.resume=true", *common))
    assert summary["epochs_trained"] == 2
    saved = torch.load(last, weights_only=True)["config"]
    assert saved["train"]["cls_loss"] == "auto" and saved["model"]["use_one_class"] is False


# ---------------------------------------------------------------------------------------------- manifest


def test_the_manifest_says_what_the_run_was_made_from(finished, data_dir):
    manifest = json.loads((finished / "manifest.json").read_text())
    made = manifest["made_from"]
    assert made["data_path"] == str(data_dir)
    assert set(made["splits"]) == {"train", "val", "test"}
    assert all(len(entry["sha256"]) == 64 for entry in made["splits"].values())
    assert made["label_to_name"] == {str(i): name for i, name in enumerate(CLASSES)}
    assert made["model"]["name"] == "n" and made["model"]["num_queries"] == 10
    assert made["img_size"] == [64, 64]
    assert manifest["exp_name"] == "run" and manifest["made_into"] == {}


def test_one_class_training_on_three_classes_says_so_in_the_checkpoint(tmp_path):
    data = make_detection_data(tmp_path / "data", {"train": 3, "val": 1})
    for label in (data / "labels").glob("*.txt"):  # classes 0..2 only
        label.write_text(
            "".join(f"{min(int(line[0]), 2)}{line[1:]}\n" for line in label.read_text().splitlines())
        )
    names = "{0: circle, 1: square, 2: triangle}"
    cfg = train_config(
        tmp_path, data, "~label_to_name", f"+label_to_name={names}", "model.use_one_class=true", *TINY
    )
    folder = Path(_run(cfg)["exp_dir"])
    for name in ("best.pt", "last.pt"):
        meta = torch.load(folder / name, weights_only=True)["meta"]
        assert (
            meta["use_one_class"] is True and meta["num_classes"] == 1 and meta["class_names"] == ["object"]
        )
        assert meta["data_class_names"] == ["circle", "square", "triangle"]
    from src.models import ModelSpec, build, load_run_checkpoint

    best = load_run_checkpoint(folder / "best.pt")
    assert best.spec == ModelSpec.from_config(cfg).with_arch_overrides(best.spec.arch_overrides)
    build(best.spec).model.load_state_dict(best.model)
