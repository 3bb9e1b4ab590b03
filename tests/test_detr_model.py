"""Numeric parity of our DETR with the official code (tests/fixtures/parity/detr, written by
tools/parity/detr/make_fixtures.py), checkpoint loading, and the family's refusals.

Procedure (the fixture README's): build in float32 with 80 classes and 100 queries, load the deterministic
weights of tests/detinit.py, switch to float64, load the fixture FrozenBatchNorm statistics; eval forward
of x/255 (the model normalises inside) and the postprocessor; train forward with dropout 0 (a model built
with dropout=0, as the official one was) and every loss term.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from src.common.errors import ConfigError
from src.models import ModelSpec, build, load_pretrained, pretrained_mismatch
from src.models.archs import ARCH_SIZES
from src.models.backbones.resnet import ResNet
from src.models.detr.criterion import DetrCriterion, build_criterion
from src.models.detr.model import DETR, build_model
from src.models.detr.postprocess import DetrPostProcessor
from src.models.detr.sizes import SIZES as DETR_SIZES
from tests.detinit import deterministic_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
DETR_FIXTURES = FIXTURES / "detr"
SIZES = ["r50", "r101", "r50_dc5", "r101_dc5"]
ORIG_SIZES_WH = torch.tensor([[640, 480], [1280, 720]])

# The D-FINE tolerances (absolute, on softmax probabilities and normalised boxes; losses relative). Ours
# matches the official code run on this machine to ~5e-15 on logits and ~1e-9 relative on losses (the
# official no-object weight is float32's 0.1). With the deterministic weights the 100 queries come out
# nearly alike (their probabilities spread only ~5e-5, logits ~5e-4, boxes ~6e-5: see the fixture README),
# so logits are also compared directly, where a query-order or query-embedding error shows.
PROB_TOL, PROB_MEDIAN_TOL = 5e-5, 1e-6
BOX_TOL, BOX_MEDIAN_TOL = 5e-6, 1e-7
LOGIT_TOL, LOGIT_MEDIAN_TOL = 1e-6, 1e-8
LOSS_RTOL = 1e-6


def _targets() -> list[dict[str, torch.Tensor]]:
    raw = json.loads((FIXTURES / "targets.json").read_text())
    return [
        {"labels": torch.tensor(t["labels"]), "boxes": torch.tensor(t["boxes_cxcywh"], dtype=torch.float64)}
        for t in raw
    ]


def parity_state(size: str) -> dict[str, torch.Tensor]:
    """The float64 state dict of the parity procedure: detinit values, then the fixture BN statistics."""
    model = build_model(size, 80)
    model.load_state_dict(deterministic_state_dict(model.state_dict()))
    state = {k: v.double() for k, v in model.state_dict().items()}
    stats = np.load(DETR_FIXTURES / f"detr_{size}_bn_stats.npz")
    return {**state, **{k: torch.from_numpy(stats[k]) for k in stats.files}}


@cache
def parity_run(size: str) -> dict:
    """Eval, postprocessor, train outputs and losses of the parity procedure (once per size)."""
    state = parity_state(size)
    images = torch.from_numpy(np.load(FIXTURES / "input_uint8.npy").astype(np.float64) / 255.0)
    model = build_model(size, 80).double()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        out = model(images)
        post = DetrPostProcessor(80)(out, ORIG_SIZES_WH)
    result = {
        "eval_pred_logits": out["pred_logits"].numpy(),
        "eval_pred_boxes": out["pred_boxes"].numpy(),
        "eval_keys": sorted(out),
        "post_scores": torch.stack([p["scores"] for p in post]).numpy(),
    }
    model = build_model(size, 80, dropout=0.0).double()
    model.load_state_dict(state)
    model.train()
    with torch.no_grad():
        out = model(images)
        losses = build_criterion(80)(out, _targets())
    result.update(
        {
            "train_pred_logits": out["pred_logits"].numpy(),
            "train_pred_boxes": out["pred_boxes"].numpy(),
            "train_aux_pred_logits": np.stack([a["pred_logits"].numpy() for a in out["aux_outputs"]]),
            "train_aux_pred_boxes": np.stack([a["pred_boxes"].numpy() for a in out["aux_outputs"]]),
            "train_keys": sorted(out),
            "losses": {k: float(v) for k, v in losses.items()},
        }
    )
    return result


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _assert_close(name: str, ours: np.ndarray, expected: np.ndarray, tol: float, median_tol: float) -> None:
    assert ours.shape == expected.shape, f"{name}: shape {ours.shape} != {expected.shape}"
    diff = np.abs(ours - expected)
    assert diff.max() <= tol, f"{name}: max abs diff {diff.max():.3e} > {tol:.0e}"
    assert np.median(diff) <= median_tol, f"{name}: median abs diff {np.median(diff):.3e} > {median_tol:.0e}"


def _check_parity(size: str) -> None:
    ours = parity_run(size)
    expected = np.load(DETR_FIXTURES / f"detr_{size}_expected.npz")
    for prefix in ("eval", "train", "train_aux"):
        logits, boxes = f"{prefix}_pred_logits", f"{prefix}_pred_boxes"
        _assert_close(logits, ours[logits], expected[logits], LOGIT_TOL, LOGIT_MEDIAN_TOL)
        probs = (_softmax(ours[logits]), _softmax(expected[logits]))
        _assert_close(f"{prefix} probs", *probs, PROB_TOL, PROB_MEDIAN_TOL)
        _assert_close(boxes, ours[boxes], expected[boxes], BOX_TOL, BOX_MEDIAN_TOL)
    # Our postprocessor on the official raw outputs is the official PostProcess, sorted by score ...
    official_raw = {k: torch.from_numpy(expected[f"eval_{k}"]) for k in ("pred_logits", "pred_boxes")}
    post = DetrPostProcessor(80)(official_raw, ORIG_SIZES_WH)
    order = np.argsort(-expected["post_scores"], axis=1, kind="stable")
    for key, name in (("labels", "post_labels"), ("boxes", "post_boxes_xyxy"), ("scores", "post_scores")):
        ranked = np.take_along_axis(expected[name], order if key != "boxes" else order[..., None], axis=1)
        np.testing.assert_allclose(
            torch.stack([p[key] for p in post]).numpy(), ranked, rtol=1e-12, atol=1e-12
        )
    # ... and on ours gives the same ranked scores.
    ranked_scores = np.sort(expected["post_scores"], axis=1)[:, ::-1]
    _assert_close("post scores", ours["post_scores"], ranked_scores, PROB_TOL, PROB_MEDIAN_TOL)
    # Every weighted loss term of the official criterion, with its official name.
    official = json.loads((DETR_FIXTURES / f"detr_{size}_losses.json").read_text())["weighted"]
    assert set(ours["losses"]) == set(official)
    for key, value in official.items():
        assert ours["losses"][key] == pytest.approx(value, rel=LOSS_RTOL), key


def test_detr_r50_parity():
    _check_parity("r50")


@pytest.mark.slow
@pytest.mark.parametrize("size", [s for s in SIZES if s != "r50"])
def test_detr_parity(size):
    _check_parity(size)


def test_output_keys():
    run = parity_run("r50")
    assert run["eval_keys"] == ["pred_boxes", "pred_logits"]
    assert run["train_keys"] == ["aux_outputs", "pred_boxes", "pred_logits"]


def test_state_dict_matches_the_official_manifest():
    manifest = json.loads((DETR_FIXTURES / "state_dict_manifest.json").read_text())
    for size in SIZES:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            ours = {key: list(value.shape) for key, value in build_model(size, 80).state_dict().items()}
        missing, extra = set(manifest[size]) - set(ours), set(ours) - set(manifest[size])
        assert not missing and not extra, f"{size}: missing {sorted(missing)[:5]} extra {sorted(extra)[:5]}"
        wrong = {k: (ours[k], v) for k, v in manifest[size].items() if ours[k] != v}
        assert not wrong, f"{size}: shape mismatches {list(wrong.items())[:5]}"


def _state_from_manifest(shapes: dict[str, list[int]], detinit: bool = True) -> dict[str, torch.Tensor]:
    """A state dict of exactly these keys and shapes with detinit values (int64 scalar step counters);
    detinit=False: zeros that take no memory (for tests that read names and shapes only)."""
    if not detinit:
        return {key: torch.zeros(()).expand(shape) for key, shape in shapes.items()}
    empty = {
        key: torch.zeros((), dtype=torch.int64) if key.endswith("num_batches_tracked") else torch.zeros(shape)
        for key, shape in shapes.items()
    }
    return deterministic_state_dict(empty)


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory) -> dict[str, Path]:
    """torchvision's ImageNet ResNet files as the manifest describes them, with detinit values."""
    manifest = json.loads((DETR_FIXTURES / "torchvision_resnet_manifest.json").read_text())
    folder = tmp_path_factory.mktemp("torchvision")
    files = {}
    for name, shapes in manifest.items():
        files[name] = folder / f"{name}-imagenet.pth"
        # ResNet-101 only has to be refused by ResNet-50 models: names and shapes are enough.
        torch.save(_state_from_manifest(shapes, detinit=name == "resnet50"), files[name])
    return files


def test_torchvision_imagenet_file_starts_the_backbone(torchvision_files):
    saved = torch.load(torchvision_files["resnet50"], weights_only=True)
    model = build_model("r50", 3, pretrained_backbone=torchvision_files["resnet50"])
    backbone = model.state_dict()
    body = {k.removeprefix("backbone.0.body."): v for k, v in backbone.items() if k.startswith("backbone.0.")}
    assert set(body) == {
        k for k in saved if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    for key, value in body.items():
        assert torch.equal(value, saved[key]), key


def test_backbone_file_of_another_depth_or_missing_is_refused_in_one_line(torchvision_files, tmp_path):
    with pytest.raises(ValueError, match="is not torchvision's resnet50 ImageNet file") as error:
        build_model("r50", 3, pretrained_backbone=torchvision_files["resnet101"])
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="ImageNet resnet101 weights not found") as error:
        build_model("r101", 3, pretrained_backbone=tmp_path / "absent.pth")
    assert "\n" not in str(error.value)


def test_dc5_keeps_stride_16_and_plain_stride_32():
    images = torch.rand(1, 3, 128, 96)
    for dilate, stride in ((False, 32), (True, 16)):
        body = ResNet("resnet50", dilate_last_stage=dilate).eval()
        with torch.no_grad():
            assert body(images).shape == (1, 2048, 128 // stride, 96 // stride)


def test_only_layer2_to_layer4_of_the_backbone_train():
    model = build_model("r50", 3)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1"))
    }
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))


def test_torchvision_file_starts_the_backbone_through_the_shared_loader(torchvision_files):
    model = build_model("r50_dc5", 3)
    report = load_pretrained(model, torchvision_files["resnet50"])
    saved = torch.load(torchvision_files["resnet50"], weights_only=True)
    assert report.key_prefix == "backbone.0.body."
    assert all(key.startswith("backbone.0.body.") for key in report.loaded)
    assert not [k for k in report.missing if k.startswith("backbone.")]
    counters = [f"backbone.0.body.{k}" for k in saved if k.endswith("num_batches_tracked")]
    assert sorted(report.unexpected) == sorted(
        ["backbone.0.body.fc.bias", "backbone.0.body.fc.weight", *counters]
    )
    assert torch.equal(
        model.state_dict()["backbone.0.body.layer4.2.conv3.weight"], saved["layer4.2.conv3.weight"]
    )
    assert "backbone-only file" in str(report)
    with pytest.raises(ValueError, match="does not fit this model's backbone") as error:
        load_pretrained(build_model("r50", 3), torchvision_files["resnet101"])
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- official DETR checkpoints


@pytest.fixture(scope="module")
def official_r50(tmp_path_factory) -> Path:
    """An official-format DETR-R50 file, {"model": state dict}, with the manifest's names and shapes (80
    classes: class_embed has 81 rows) and detinit values."""
    manifest = json.loads((DETR_FIXTURES / "state_dict_manifest.json").read_text())["r50"]
    path = tmp_path_factory.mktemp("official") / "detr-r50.pth"
    torch.save({"model": _state_from_manifest(manifest), "epoch": 299}, path)
    return path


def test_official_file_loads_into_the_same_model_exactly(official_r50):
    model = build_model("r50", 80)
    report = load_pretrained(model, official_r50)
    saved = torch.load(official_r50, weights_only=True)["model"]
    assert report.weights == "model" and report.arch == "detr"
    assert not report.reinitialised and not report.missing and not report.unexpected
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_official_file_adapts_classes_and_queries(official_r50):
    """The fine-tuning notes' recipe: class_embed re-sized to the new classes + 1 and query_embed fresh
    when the query count differs; COCO-named classes start from their COCO rows, "no object" is kept."""
    saved = torch.load(official_r50, weights_only=True)["model"]
    model = build_model("r50", 3, num_queries=50)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, official_r50, class_names=["widget", "person", "car"])
    state = model.state_dict()
    assert sorted(report.reinitialised) == ["class_embed.bias", "class_embed.weight", "query_embed.weight"]
    assert report.class_rows_from_coco == {"person": "person", "car": "car"}
    for key in ("class_embed.weight", "class_embed.bias"):
        assert torch.equal(state[key][0], fresh[key][0])  # widget: not a COCO class
        assert torch.equal(state[key][1], saved[key][0])  # person: COCO row 0
        assert torch.equal(state[key][2], saved[key][2])  # car: COCO row 2
        assert torch.equal(state[key][3], saved[key][80])  # no object: the last row
    assert torch.equal(state["query_embed.weight"], fresh["query_embed.weight"])
    text = str(report)
    assert "class_embed.weight" in text and "query_embed.weight" in text and "person<-person" in text
    assert "no-object row was kept" in text
    same_queries = build_model("r50", 3)
    report = load_pretrained(same_queries, official_r50)
    assert "query_embed.weight" in report.loaded
    assert torch.equal(same_queries.state_dict()["query_embed.weight"], saved["query_embed.weight"])


def test_released_coco_layout_rows_are_category_ids(official_r50, tmp_path):
    """The released files have 91 COCO ids + "no object" (92 rows): a class starts from its id's row."""
    saved = torch.load(official_r50, weights_only=True)["model"]
    released = {**saved, "class_embed.weight": torch.randn(92, 256), "class_embed.bias": torch.randn(92)}
    torch.save({"model": released}, tmp_path / "detr-r50-e632da11.pth")
    model = build_model("r50", 2)
    load_pretrained(model, tmp_path / "detr-r50-e632da11.pth", class_names=["car", "toothbrush"])
    state = model.state_dict()
    for key in ("class_embed.weight", "class_embed.bias"):
        assert torch.equal(state[key][0], released[key][3])  # car: COCO id 3
        assert torch.equal(state[key][1], released[key][90])  # toothbrush: COCO id 90
        assert torch.equal(state[key][2], released[key][91])  # no object


def _spec(size: str = "r50", **kwargs) -> ModelSpec:
    settings = {"img_size": (320, 320), "data_class_names": ("a", "b", "c"), "num_queries": 100, **kwargs}
    return ModelSpec(arch="detr", size=size, **settings)


def test_file_of_another_size_or_family_is_refused_in_one_line(official_r50, tmp_path):
    assert pretrained_mismatch(official_r50, _spec("r50")) is None
    assert pretrained_mismatch(official_r50, _spec("r50_dc5")) is None  # the same tensors: cannot tell
    message = pretrained_mismatch(official_r50, _spec("r101"))
    assert "holds DETR-R50 or DETR-R50-DC5 weights" in message and "asks for DETR-R101" in message
    r101 = json.loads((DETR_FIXTURES / "state_dict_manifest.json").read_text())["r101"]
    torch.save(_state_from_manifest(r101, detinit=False), tmp_path / "r101.pth")
    message = pretrained_mismatch(tmp_path / "r101.pth", _spec("r50"))
    assert "holds DETR-R101 or DETR-R101-DC5 weights" in message and "asks for DETR-R50" in message
    ours = {"model": torch.load(official_r50, weights_only=True)["model"], "meta": _spec("r50").to_meta()}
    torch.save(ours, tmp_path / "ours.pt")  # our checkpoints record the size: DC5 or not is known
    assert "asks for DETR-R50-DC5" in pretrained_mismatch(tmp_path / "ours.pt", _spec("r50_dc5"))
    dfine = json.loads((FIXTURES / "state_dict_manifest.json").read_text())["n"]
    torch.save(_state_from_manifest(dfine, detinit=False), tmp_path / "dfine.pth")
    message = pretrained_mismatch(tmp_path / "dfine.pth", _spec("r50"))
    assert "D-FINE" in message and "model.arch=detr asks for DETR" in message
    assert "\n" not in message


# ---------------------------------------------------------------- the family


def test_family_builds_model_criterion_and_postprocessor():
    assert ARCH_SIZES["detr"] == tuple(DETR_SIZES)
    spec = _spec("r50", data_class_names=("cat", "dog"), num_queries=20)
    model, criterion, postprocessor = build(spec)
    assert isinstance(model, DETR) and isinstance(criterion, DetrCriterion)
    assert model.class_embed.out_features == 3 and model.query_embed.num_embeddings == 20
    with torch.no_grad():
        labels, boxes, scores = postprocessor.deploy()(
            model.deploy()(torch.rand(2, 3, 320, 320)), torch.tensor([[64, 48]] * 2)
        )
    assert labels.shape == (2, 20) and boxes.shape == (2, 20, 4) and scores.shape == (2, 20)
    assert labels.max() < 2 and torch.all(scores[:, :-1] >= scores[:, 1:])
    assert build_criterion(2, bg_loss_weight=3.0).eos_coef == pytest.approx(0.3)


def test_grid_smaller_than_the_queries_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"model.img_size=\[256, 192\] gives DETR-R50 a 8x6 grid of 48 cells"
    ) as error:
        build(_spec("r50", img_size=(256, 192), num_queries=49))
    assert "at most 48 queries" in str(error.value)
    assert isinstance(build(_spec("r50", img_size=(256, 192), num_queries=48)).model, DETR)


def test_unknown_size_lists_the_detr_sizes():
    with pytest.raises(ConfigError, match="choose one of r50 | r101 | r50_dc5 | r101_dc5"):
        _spec("r34")
