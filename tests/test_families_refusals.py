"""Bad model choices of any family are refused by the train stage in one line, before anything is written: an
unknown size, a DETR input too small for its queries, segmentation on a detector-only family, a pretrained
checkpoint of another family or size. Also: train.lrs per family, and an experiment from before model.arch
still runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from src.common.config import ROOT, load_config
from src.common.errors import ConfigError, UserError
from src.dl.train.run import run as train
from src.dl.train.settings import TrainSettings, train_lrs
from src.models import ModelSpec, build
from tests.helpers.train_data import make_detection_data, train_config, train_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_detection_data(tmp_path_factory.mktemp("data"), {"train": 2, "val": 1})


@pytest.mark.parametrize(("overrides", "said"), [
    (("model.arch=rtdetrv2", "model.name=n"),
     "model.name='n' is not a size of model.arch=rtdetrv2; choose one of r18 | r34 | r50m | r50 | r101"),
    (("model.arch=rtdetrv2", "model.name=r19"),  # no train.lrs entry either: the size is what is wrong
     "model.name='r19' is not a size of model.arch=rtdetrv2; choose one of r18 | r34 | r50m | r50 | r101"),
    (("model.arch=detr", "model.name=r50", "model.num_queries=10"),
     "model.img_size=[64, 64] gives DETR-R50 a 2x2 grid of 4 cells at stride 32, fewer than "
     "model.num_queries=10: use a larger model.img_size or at most 4 queries"),
    (("model.arch=rtdetrv2", "model.name=r18", "model.task=segment"),
     "model.task=segment is not available for RT-DETRv2 (it supports detect); model.task=segment needs "
     "model.arch=dfine | deim_dfine"),
    (("model.arch=detr", "model.name=r101", "model.img_size=[320,320]", "model.task=segment"),
     "model.task=segment is not available for DETR"),
], ids=["unknown-size", "unknown-size-without-lrs", "detr-queries", "rtdetr-segment", "detr-segment"])  # fmt: skip
def test_a_bad_model_choice_is_refused_before_anything_is_written(tmp_path, data_dir, overrides, said):
    with pytest.raises(ConfigError) as refusal:
        train(train_config(tmp_path, data_dir, *overrides))
    assert said in str(refusal.value) and "\n" not in str(refusal.value)
    assert not (tmp_path / "output").exists()


def _official_file(folder: Path, arch: str, size: str, side: int = 64) -> Path:
    """A {"model": state dict} file of (arch, size), as the official trainings save them."""
    spec = ModelSpec(arch=arch, size=size, img_size=(side, side), data_class_names=("a", "b"), num_queries=4)
    path = folder / f"{arch}_{size}.pth"
    torch.save({"model": build(spec).model.state_dict()}, path)
    return path


def test_a_checkpoint_of_another_family_or_size_is_refused_by_the_train_stage(tmp_path, data_dir):
    rtdetr = _official_file(tmp_path, "rtdetrv2", "r18")
    dfine = _official_file(tmp_path, "dfine", "n")
    detr = _official_file(tmp_path, "detr", "r50")
    cases = [
        (rtdetr, ("model.arch=dfine", "model.name=n"), "holds RT-DETRv2 weights, but model.arch=dfine asks for D-FINE"),
        (dfine, ("model.arch=detr", "model.name=r50", "model.img_size=[96,96]", "model.num_queries=8"),
         "holds D-FINE/DEIM-D-FINE weights, but model.arch=detr asks for DETR"),
        (detr, ("model.arch=rtdetrv2", "model.name=r18"), "holds DETR weights, but model.arch=rtdetrv2 asks for RT-DETRv2"),
        (rtdetr, ("model.arch=rtdetrv2", "model.name=r34"),
         "holds RT-DETRv2-R18 weights, but model.name=r34 asks for RT-DETRv2-R34"),
    ]  # fmt: skip
    for path, overrides, said in cases:
        cfg = train_config(tmp_path, data_dir, *overrides, f"train.pretrained_model_path={path}")
        with pytest.raises(UserError) as refusal:
            train(cfg)
        message = str(refusal.value)
        assert said in message and str(path) in message and "\n" not in message, message
    assert not (tmp_path / "output").exists()


def test_the_cli_refuses_another_familys_checkpoint_with_exit_2(tmp_path, data_dir):
    rtdetr = _official_file(tmp_path, "rtdetrv2", "r18")
    overrides = train_overrides(
        tmp_path, data_dir, f"train.pretrained_model_path={rtdetr}"
    )  # model.arch=dfine
    done = subprocess.run(
        [sys.executable, "-m", "src.dl.train", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "holds RT-DETRv2 weights, but model.arch=dfine asks for D-FINE" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "output").exists()


def test_train_lrs_take_the_arch_qualified_entry_before_the_size_name():
    lrs = load_config([]).train.lrs
    assert train_lrs(lrs, "detr", "r50") == (0.0001, 0.00001)  # DETR's official (the bare r50 entry)
    assert train_lrs(lrs, "rtdetrv2", "r50") == (0.0001, 0.00001)
    assert train_lrs(lrs, "rtdetrv2", "r101") == (0.0001, 0.000001)  # not DETR's r101
    assert train_lrs(lrs, "deim_rtdetrv2", "r18") == (0.0002, 0.0002)
    assert train_lrs(lrs, "dfine", "n") == (0.0008, 0.0004)  # D-FINE's bare entries as before
    assert train_lrs({"n": {"base_lr": 1, "backbone_lr": 2}, "dfine_n": {"base_lr": 3, "backbone_lr": 4}},
                     "dfine", "n") == (3.0, 4.0)  # fmt: skip
    with pytest.raises(ConfigError, match=r"add train.lrs.rtdetrv2_r18=\{base_lr"):
        train_lrs({"n": {"base_lr": 1, "backbone_lr": 2}}, "rtdetrv2", "r18")
    settings = TrainSettings.from_config(
        load_config(["model.arch=rtdetrv2", "model.name=r34", "train.lrs.rtdetrv2_r34.base_lr=0.0003"])
    )
    assert (settings.optim.base_lr, settings.optim.backbone_lr) == (0.0003, 0.00005)


def test_an_experiment_from_before_model_arch_still_runs(tmp_path):
    """best.pt meta and config.yaml with model.variant and no model.arch (as written before the families)."""
    from src.dl import infer
    from tests.helpers.deploy_data import deploy_config, make_checkpoint, make_data

    cfg = deploy_config(tmp_path)
    data = make_data(cfg)
    best = make_checkpoint(cfg)
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    checkpoint["meta"].pop("arch")
    checkpoint["meta"]["variant"] = "dfine"
    torch.save(checkpoint, best)
    saved = yaml.safe_load((best.parent / "config.yaml").read_text())
    del saved["model"]["arch"]
    saved["model"]["variant"] = "dfine"
    (best.parent / "config.yaml").write_text(yaml.safe_dump(saved))

    image = sorted((data / "images").glob("*.jpg"))[0]
    summary = infer.run(deploy_config(tmp_path, f"infer.input={image}", f"infer.model_path={best}"))
    assert summary["backend"] == "torch" and summary["images"] == 1


def test_an_imagenet_resnet_vd_file_starts_an_rtdetrv2_backbone(tmp_path):
    """The paddle-converted ImageNet files carry no BatchNorm counters; r18/r34 train their norms (and so
    have counters): the file still fits, as train.pretrained_model_path."""
    from src.models import load_pretrained
    from src.models.backbones.presnet import PResNet

    path = tmp_path / "ResNet18_vd_pretrained_from_paddle.pth"
    imagenet = PResNet(18, freeze_norm=True).state_dict()
    assert not [key for key in imagenet if key.endswith("num_batches_tracked")]
    torch.save(imagenet, path)
    spec = ModelSpec(arch="rtdetrv2", size="r18", img_size=(64, 64), data_class_names=("a",), num_queries=8)
    model = build(spec).model
    report = load_pretrained(model, path)
    assert report.key_prefix == "backbone." and len(report.loaded) == len(imagenet)
    weight = "res_layers.3.blocks.1.branch2b.conv.weight"
    assert torch.equal(model.state_dict()[f"backbone.{weight}"], imagenet[weight])


def test_a_missing_official_file_of_any_family_says_where_to_download_it(tmp_path, data_dir):
    cases = {
        "detr-r50-e632da11.pth": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
        "rtdetrv2_r18vd_120e_coco_rerun_48.1.pth": "https://github.com/lyuwenyu/storage/releases/download/v0.2/",
        "ResNet50_vd_ssld_v2_pretrained_from_paddle.pth": "https://github.com/lyuwenyu/storage/releases/",
    }
    for name, address in cases.items():
        path = tmp_path / "pretrained" / name
        with pytest.raises(UserError) as refusal:
            train(train_config(tmp_path, data_dir, f"train.pretrained_model_path={path}"))
        message = str(refusal.value)
        assert f"official release file: download {address}" in message and str(path) in message, message
        assert "\n" not in message
    assert not (tmp_path / "output").exists()
