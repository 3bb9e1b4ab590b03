"""The family registry: one key picks the detector, sizes are checked per arch, a checkpoint of another
family or size is refused in one line naming what it holds and what was asked for."""

from __future__ import annotations

import pytest
import torch

from src.common.config import load_config
from src.common.errors import ConfigError
from src.models import FAMILIES, ModelSpec, build, family_of, pretrained_mismatch
from src.models.archs import ARCH_SIZES, display_name

IMG = (64, 64)


def _spec(arch: str = "dfine", size: str = "n", **changes) -> ModelSpec:
    fields = dict(arch=arch, size=size, img_size=IMG, data_class_names=("a", "b", "c"), num_queries=20)
    return ModelSpec(**(fields | changes))


def test_every_arch_has_exactly_one_family():
    archs = [arch for family in FAMILIES for arch in family.archs]
    assert sorted(archs) == sorted(ARCH_SIZES) and len(set(archs)) == len(archs)
    assert all(family_of(arch).name for arch in ARCH_SIZES)


def test_unknown_size_or_arch_lists_the_valid_names():
    with pytest.raises(
        ConfigError, match=r"model.name='r18' is not a size of model.arch=dfine; choose one of n \| s"
    ):
        _spec(size="r18")
    with pytest.raises(ConfigError, match="model.arch='yolo' is not a known detector; choose one of dfine"):
        _spec(arch="yolo")
    with pytest.raises(ConfigError, match="not a size of model.arch=deim_dfine"):
        ModelSpec.from_config(load_config(["model.arch=deim_dfine", "model.name=huge"]))


def test_display_names():
    assert display_name("dfine", "n") == "D-FINE-N"
    assert display_name("detr", "r50_dc5") == "DETR-R50-DC5"
    assert _spec("deim_dfine", "s").display_name == "DEIM-D-FINE-S"


def test_a_checkpoint_of_another_size_is_refused_in_one_line(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"model": build(_spec(size="n")).model.state_dict()}, path)
    message = pretrained_mismatch(path, _spec(size="s"))
    assert message is not None and "\n" not in message
    assert f"{path} holds D-FINE-N weights, but model.name=s asks for D-FINE-S" in message
    # the same size fits, whatever the classes, queries and input size
    assert pretrained_mismatch(path, _spec(size="n", data_class_names=("x",), num_queries=7)) is None
    # a state dict of no known family: load_pretrained reports what it finds
    assert pretrained_mismatch({"head.weight": torch.zeros(2, 2)}, _spec()) is None
