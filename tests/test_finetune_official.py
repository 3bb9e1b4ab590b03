"""Saving in a family's official checkpoint format, and the fine-tuning path from such a file.

1. The saved file has the official layout (the solver's {"model", "ema": {"module"}}, DETR's {"model",
   "epoch"}) and exactly the official model's tensor names and shapes (the manifests in
   tests/fixtures/parity/, written from the official models at 80 classes, 640 px).
2. Per family: train on set A (3 classes) -> save official (the stage) -> train on set B (2 classes) from
   that file: the load report says what was reused (backbone, encoder, decoder) and what was re-initialised
   (class heads, denoising class embedding), and the run trains.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch

from src.common.config import load_config
from src.models import ModelSpec, build, load_pretrained
from src.models.archs import default_queries
from src.models.checkpoint import read_checkpoint
from src.models.official import official_file_name, official_state, save_official_checkpoint
from tests.helpers.train_data import make_detection_data, train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

PARITY = Path(__file__).parent / "fixtures" / "parity"
MANIFESTS = {  # arch -> (manifest file, its key for the family's smallest size)
    "dfine": (PARITY / "state_dict_manifest.json", "n"),
    "deim_dfine": (PARITY / "deim" / "deim_state_dict_manifest.json", "n"),
    "rtdetrv2": (PARITY / "rtdetrv2" / "rtdetrv2_state_dict_manifest.json", "r18"),
    "deim_rtdetrv2": (PARITY / "rtdetrv2" / "deim_rtdetrv2_state_dict_manifest.json", "r18"),
    "detr": (PARITY / "detr" / "state_dict_manifest.json", "r50"),
}
A_CLASSES = "label_to_name={0: circle, 1: square, 2: triangle}"
B_CLASSES = "label_to_name={0: ring, 1: block}"
# Per family: the smallest size, and an input whose stride-32 grid holds DETR's queries.
FAMILY_RUNS = {
    "dfine": ("model.arch=dfine", "model.name=n", "model.img_size=[64,64]"),
    "rtdetrv2": (
        "model.arch=rtdetrv2",
        "model.name=r18",
        "model.img_size=[64,64]",
        "++train.lrs.r18={base_lr: 0.0001, backbone_lr: 0.00001}",  # the official r18 config's
    ),  # fmt: skip
    "detr": ("model.arch=detr", "model.name=r50", "model.img_size=[128,128]"),
}

# What a fine-tune must reuse: the whole detector but its class-dependent heads.
REUSED_PARTS = {
    "dfine": {"backbone", "encoder", "decoder"},
    "rtdetrv2": {"backbone", "encoder", "decoder"},
    "detr": {"backbone", "transformer.encoder", "transformer.decoder", "bbox_embed", "input_proj"},
}


def _spec(arch: str, size: str, classes: int = 80, img_size: int = 640) -> ModelSpec:
    names = tuple(f"c{i}" for i in range(classes))
    return ModelSpec(arch, size, (img_size, img_size), names, num_queries=default_queries(arch))


@cache
def _uninitialised_state(arch: str, size: str) -> dict[str, torch.Tensor]:
    """Our model's state dict at the manifests' configuration (80 classes, 640 px); values are not needed."""
    with torch.device("meta"):
        model = build(_spec(arch, size)).model
    return model.to_empty(device="cpu").state_dict()


@pytest.mark.parametrize("arch", list(MANIFESTS))
def test_official_layout_has_the_official_names_and_shapes(tmp_path, arch):
    manifest_file, size = MANIFESTS[arch]
    manifest = json.loads(manifest_file.read_text())[size]
    spec = _spec(arch, size)
    path = tmp_path / official_file_name(spec, "coco")
    save_official_checkpoint(path, spec, _uninitialised_state(arch, size), epoch=12)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if arch == "detr":  # DETR's main.py: {"model", "optimizer", "lr_scheduler", "epoch", "args"}
        assert set(raw) == {"model", "epoch"} and raw["epoch"] == 11
        states = [raw["model"]]
    else:  # the DEIM solver's state_dict(): both read by -r, ema.module by -t
        assert set(raw) == {"date", "model", "ema"} and set(raw["ema"]) == {"module"}
        states = [raw["model"], raw["ema"]["module"]]
    for state in states:
        assert {key: list(value.shape) for key, value in state.items()} == manifest
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_detr_class_head_keeps_the_no_object_row_last(tmp_path):
    """Official DETR for N classes has class_embed rows 0..N-1 then "no object": ours is saved as it is."""
    spec = _spec("detr", "r50", classes=3)
    state = build(spec).model.state_dict()
    path = save_official_checkpoint(tmp_path / "detr.pth", spec, state, epoch=1)
    saved = torch.load(path, weights_only=True)["model"]
    assert saved["class_embed.weight"].shape == (4, 256)
    assert torch.equal(saved["class_embed.bias"], state["class_embed.bias"])


def test_a_segmentation_model_is_refused():
    spec = ModelSpec("dfine", "n", (64, 64), ("a",), task="segment")
    with pytest.raises(ValueError, match="no mask branch"):
        official_state(spec, {"mask_head.proj.weight": torch.zeros(1)})


def test_reload_with_another_class_count_reports_reused_and_reinitialised(tmp_path):
    spec = _spec("rtdetrv2", "r18", classes=3, img_size=64)
    trained = build(spec).model.state_dict()
    path = save_official_checkpoint(tmp_path / official_file_name(spec, "a"), spec, trained, epoch=3)
    model = build(_spec("rtdetrv2", "r18", classes=5, img_size=64)).model
    report = load_pretrained(model, path)
    assert report.weights == "ema" and report.arch == "rtdetrv2"
    assert set(report.reused_parts()) == {"backbone", "encoder", "decoder"}
    kinds = report.reinitialised_kinds()
    assert set(kinds) == {"class heads", "denoising class embedding"}
    assert kinds["denoising class embedding"] == ["decoder.denoising_class_embed.weight"]
    assert "decoder.enc_score_head.weight" in kinds["class heads"]
    assert not report.missing and not report.unexpected
    loaded = model.state_dict()
    assert torch.equal(
        loaded["backbone.conv1.conv1_1.conv.weight"], trained["backbone.conv1.conv1_1.conv.weight"]
    )
    text = str(report)
    assert "reused: backbone" in text and "denoising class embedding 1" in text


# ------------------------------------------------------------------------------------ the fine-tune path


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[Path, Path]:
    """Set A: 3 classes; set B: another seed, 2 classes."""
    root = tmp_path_factory.mktemp("finetune_data")
    a = make_detection_data(root / "a", {"train": 4, "val": 2, "test": 1}, num_classes=3, seed=1)
    b = make_detection_data(root / "b", {"train": 4, "val": 2, "test": 1}, num_classes=2, seed=2)
    return a, b


def _train(tmp_path: Path, data: Path, *overrides: str) -> Path:
    from src.dl.train import run

    return Path(run(train_config(tmp_path, data, *overrides))["exp_dir"])


@pytest.mark.parametrize("family", list(FAMILY_RUNS))
def test_fine_tune_from_an_official_format_file(tmp_path, sets, family):
    from src.dl.save_official import run as save_official

    set_a, set_b = sets
    model_keys = FAMILY_RUNS[family]
    common = (*model_keys, "model.num_queries=10", "train.max_steps_per_epoch=2", "train.debug_images=0")
    folder_a = _train(tmp_path, set_a, A_CLASSES, "exp_name=a", *common)
    official = save_official(load_config([f"output_dir={tmp_path / 'output'}", "exp_name=a"]))
    assert official.parent == folder_a and official.name.startswith(f"{family}_")
    assert read_checkpoint(official).meta == {}  # nothing of ours: it goes the way of any official file

    folder_b = _train(
        tmp_path, set_b, B_CLASSES, "exp_name=b", f"train.pretrained_model_path={official}", *common
    )
    log = (folder_b / "train_log.txt").read_text()
    assert "pretrained weights: loaded" in log and str(official) in log
    reused_line = next(line for line in log.splitlines() if line.strip().startswith("reused: "))
    reused = {part.rsplit(" ", 1)[0] for part in reused_line.split(": ", 1)[1].split(", ")}
    assert REUSED_PARTS[family] <= reused, reused_line
    assert "re-initialised (shape follows classes, queries or image size): class heads" in log
    if family == "detr":  # no denoising; the "no object" row is class-independent and kept
        assert "no-object row was kept" in log
    else:
        assert "denoising class embedding 1 [decoder.denoising_class_embed.weight]" in log
    best = torch.load(folder_b / "best.pt", map_location="cpu", weights_only=True)
    assert best["meta"]["data_class_names"] == ["ring", "block"]
    head = "class_embed.bias" if family == "detr" else "decoder.enc_score_head.bias"
    assert best["model"][head].shape[0] == (3 if family == "detr" else 2)


def test_the_stage_refuses_an_experiment_without_best_pt(tmp_path):
    from src.common.errors import UserError
    from src.dl.save_official import run as save_official

    with pytest.raises(UserError, match="best.pt not found"):
        save_official(load_config([f"output_dir={tmp_path}", "exp_name=never_trained"]))
