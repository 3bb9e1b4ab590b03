"""RT-DETRv2 and DEIM-RT-DETRv2: numeric parity with the official models, loading of official and ImageNet
files, and the model's behaviour outside the parity set-up.

Parity follows tools/parity/rtdetrv2/README.md: our model built in float32 (80 classes, 640x640), the
deterministic weights of tests/detinit.py, float64, the fixture BatchNorm statistics; then the eval
forward, the postprocessor, the train forward without denoising and every loss term against what the
unmodified official code produced.
"""

from __future__ import annotations

import copy
import json
from functools import cache

import numpy as np
import pytest
import torch

from src.common.errors import ConfigError
from src.dl.export import outputs_match
from src.models import ModelSpec, build, family_of, pretrained_mismatch
from src.models.archs import RTDETR_SIZES
from src.models.attention import deformable_sample
from src.models.backbones import presnet
from src.models.backbones.presnet import PResNet
from src.models.denoising import set_denoising_negatives
from src.models.family import LossSettings
from src.models.hybrid_encoder import VGGBlock
from src.models.layers import ConvNormLayer
from src.models.pretrained import load_pretrained
from src.runtime.torch_model import DeployModel
from tests.detinit import deterministic_state_dict
from tests.parity_data import (
    FIXTURES,
    ORIG_SIZES_WH,
    assert_losses_match,
    assert_matches_manifest,
    assert_outputs_match,
    assert_postprocessing_matches,
    parity_input,
    parity_targets,
    prepare_parity_model,
)

RTDETR = FIXTURES / "rtdetrv2"
ARCHS = ("rtdetrv2", "deim_rtdetrv2")
COCO_NAMES = tuple(str(i) for i in range(80))


def _spec(arch: str, size: str, **changes) -> ModelSpec:
    fields = dict(arch=arch, size=size, img_size=(640, 640), data_class_names=COCO_NAMES)
    return ModelSpec(**(fields | changes))


@cache
def parity_run(arch: str, size: str) -> dict:
    """Eval, postprocessor, train outputs and loss terms of the parity procedure (once per model)."""
    model, criterion, postprocessor = build(_spec(arch, size))
    prepare_parity_model(model, RTDETR / f"{arch}_{size}_bn_stats.npz")
    images, targets = parity_input(), parity_targets()
    model.eval()
    with torch.no_grad():
        out = model(images)
        post = postprocessor(out, ORIG_SIZES_WH)
    result = {
        "eval_pred_logits": out["pred_logits"].numpy(),
        "eval_pred_boxes": out["pred_boxes"].numpy(),
        "post_scores": torch.stack([p["scores"] for p in post]).numpy(),
    }
    model.train()
    model.decoder.num_denoising = 0
    with torch.no_grad():
        out = model(images, targets)
        result["losses"] = {k: float(v) for k, v in criterion(out, targets).items()}
    result["train_pred_logits"] = out["pred_logits"].numpy()
    result["train_pred_boxes"] = out["pred_boxes"].numpy()
    result["train_keys"] = sorted(out)
    return result


def _check_parity(arch: str, size: str) -> None:
    ours = parity_run(arch, size)
    expected = np.load(RTDETR / f"{arch}_{size}_expected.npz")
    assert_outputs_match(ours, expected)
    postprocessor = family_of(arch).build_postprocessor(_spec(arch, size))
    assert_postprocessing_matches(postprocessor, expected, ours["post_scores"])
    assert_losses_match(ours["losses"], json.loads((RTDETR / f"{arch}_{size}_losses.json").read_text()))


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_r18(arch):
    _check_parity(arch, "r18")


@pytest.mark.slow
@pytest.mark.parametrize("size", [s for s in RTDETR_SIZES if s != "r18"])
@pytest.mark.parametrize("arch", ARCHS)
def test_parity_all_sizes(arch, size):
    _check_parity(arch, size)


def test_train_output_keys_match_official():
    assert parity_run("rtdetrv2", "r18")["train_keys"] == sorted(
        ["pred_logits", "pred_boxes", "aux_outputs", "enc_aux_outputs", "enc_meta"]
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_matches_manifest(arch):
    expected = json.loads((RTDETR / f"{arch}_state_dict_manifest.json").read_text())
    for size in RTDETR_SIZES:
        with torch.device("meta"):
            state = build(_spec(arch, size)).model.state_dict()
        assert_matches_manifest(state, expected[size], f"{arch}-{size}")


# ---------------------------------------------------------------------- official and ImageNet files


@cache
def _official_state(arch: str, size: str) -> dict[str, torch.Tensor]:
    """A state dict of the official model's exact names and shapes (its manifest), deterministic values;
    the image-size buffers are our model's own (they are computed, never trained)."""
    manifest = json.loads((RTDETR / f"{arch}_state_dict_manifest.json").read_text())[size]
    own = build(_spec(arch, size)).model.state_dict()
    template = {key: torch.zeros(shape, dtype=own[key].dtype) for key, shape in manifest.items()}
    fixed = {"decoder.anchors", "decoder.valid_mask"}
    return deterministic_state_dict(template, fixed) | {key: own[key] for key in fixed}


@pytest.mark.parametrize("layout", ["ema", "model"])
def test_official_checkpoint_loads(tmp_path, layout):
    state = _official_state("rtdetrv2", "r18")
    path = tmp_path / "rtdetrv2_r18vd_120e_coco.pth"
    torch.save({"ema": {"module": state, "updates": 10}} if layout == "ema" else {"model": state}, path)
    model = build(_spec("rtdetrv2", "r18")).model
    report = load_pretrained(model, path)
    assert not report.missing and not report.unexpected and not report.reinitialised
    assert report.arch == "rtdetrv2"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_official_checkpoint_into_fewer_classes_reports_the_class_heads(tmp_path):
    """Fine-tuning from a COCO file: every tensor but the class-dependent ones is reused."""
    state = _official_state("deim_rtdetrv2", "r18")
    path = tmp_path / "deim_rtdetrv2_r18.pth"
    torch.save({"ema": {"module": state}}, path)
    model = build(_spec("deim_rtdetrv2", "r18", data_class_names=("cat", "kite", "widget"))).model
    report = load_pretrained(model, path, class_names=["cat", "kite", "widget"])
    assert report.arch == "deim_rtdetrv2"
    assert sorted(report.reinitialised) == sorted(
        [
            "decoder.denoising_class_embed.weight",
            "decoder.enc_score_head.weight",
            "decoder.enc_score_head.bias",
        ]
        + [f"decoder.dec_score_head.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    )
    head = model.state_dict()["decoder.dec_score_head.0.weight"]
    torch.testing.assert_close(head[1], state["decoder.dec_score_head.0.weight"][33])  # kite = COCO class 33
    assert not report.missing and not report.unexpected


def test_a_file_of_another_size_or_family_is_refused_in_one_line(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save({"model": _official_state("rtdetrv2", "r18")}, path)
    message = pretrained_mismatch(path, _spec("rtdetrv2", "r34"))
    assert message is not None and "\n" not in message
    assert "holds RT-DETRv2-R18 weights, but model.name=r34 asks for RT-DETRv2-R34" in message
    message = pretrained_mismatch(
        path, ModelSpec(arch="dfine", size="n", img_size=(640, 640), data_class_names=("a",))
    )
    assert message is not None and "holds RT-DETRv2 weights, but model.arch=dfine asks for D-FINE" in message
    assert (
        pretrained_mismatch(path, _spec("rtdetrv2", "r18", num_queries=100, data_class_names=("a",))) is None
    )


def _backbone_file(tmp_path, depth: int):
    manifest = json.loads((RTDETR / "presnet_backbone_manifest.json").read_text())[str(depth)]
    state = deterministic_state_dict({key: torch.zeros(shape) for key, shape in manifest.items()})
    path = tmp_path / f"ResNet{depth}_vd.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize(
    "depth",
    [
        18,
        pytest.param(34, marks=pytest.mark.slow),
        pytest.param(50, marks=pytest.mark.slow),
        pytest.param(101, marks=pytest.mark.slow),
    ],
)
def test_imagenet_backbone_file_loads(tmp_path, depth):
    path, state = _backbone_file(tmp_path, depth)
    for frozen in (True, False):  # both kinds of norm take the file (a trainable one keeps its counter)
        backbone = PResNet(depth, freeze_norm=frozen)
        backbone.load_pretrained(path)
        loaded = backbone.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_backbone_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="ResNet18-vd file not found"):
        PResNet(18).load_pretrained(tmp_path / "missing.pth")
    torch.save({"conv1.unknown.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="does not fit ResNet18-vd"):
        PResNet(18).load_pretrained(tmp_path / "bad.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="not a readable ResNet-vd state dict"):
        PResNet(18).load_pretrained(tmp_path / "text.pth")
    monkeypatch.setattr(presnet, "PRETRAINED_URL", "http://127.0.0.1:9/{file}")  # a port nothing listens on
    with pytest.raises(RuntimeError, match="Could not download the pretrained ResNet18-vd backbone") as error:
        PResNet(18).load_pretrained(True, cache_dir=tmp_path / "cache")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------- behaviour outside the parity set-up


def _small(arch: str = "rtdetrv2", size: str = "r18", img_size=(160, 160), losses=None, **changes):
    """(spec, a fresh copy of a small detector): 3 classes, 40 queries; each model is initialised once."""
    spec = _spec(arch, size, img_size=img_size, data_class_names=("a", "b", "c"), num_queries=40, **changes)
    key = repr((spec, losses))
    if key not in _BUILT:
        torch.manual_seed(0)
        _BUILT[key] = build(spec, losses)
    return spec, copy.deepcopy(_BUILT[key])


_BUILT: dict[str, tuple] = {}


def _random_targets(batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(batch):
        n = 1 + i
        centres = torch.rand(n, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, 3, (n,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], 1)})
    return targets


def test_deploy_keeps_eval_outputs():
    _, (model, _, _) = _small("deim_rtdetrv2")
    model.double().eval()
    images = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        before = model(images)
        model.deploy()
        after = model(images)
    folded = [m for m in model.modules() if isinstance(m, (ConvNormLayer, VGGBlock))]
    assert len(folded) > 50 and not any(hasattr(m, "norm") or hasattr(m, "conv1") for m in folded)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-9)


def test_eval_runs_only_up_to_eval_idx():
    """RT-DETRv2 R50-m trains 6 decoder layers and evaluates the third; deploy keeps three."""
    with torch.device("meta"):
        model = build(_spec("rtdetrv2", "r50m")).model
        assert len(model.decoder.decoder.layers) == 6 and model.decoder.eval_idx == 2
        model.deploy()
    assert len(model.decoder.decoder.layers) == 3 and len(model.decoder.dec_bbox_head) == 3
    with torch.device("meta"):
        deim = build(_spec("deim_rtdetrv2", "r50m")).model
    assert len(deim.decoder.decoder.layers) == 3 and deim.decoder.eval_idx == 2


def test_train_step_with_denoising_backpropagates():
    _, (model, criterion, _) = _small()
    targets = _random_targets(2)
    out = model.train()(torch.rand(2, 3, 160, 160), targets)
    assert out["pred_logits"].shape == (2, 40, 3) and len(out["aux_outputs"]) == 2
    assert len(out["dn_outputs"]) == 3 and out["dn_meta"]["dn_num_split"][1] == 40
    losses = criterion(out, targets)
    assert {"loss_vfl_dn_0", "loss_bbox_dn_2", "loss_giou_enc_0", "loss_vfl_aux_1"} <= set(losses)
    sum(losses.values()).backward()
    for part in (
        "backbone.conv1.conv1_1",
        "encoder.fpn_blocks",
        "decoder.dec_bbox_head.0",
        "decoder.query_pos_head",
    ):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(part)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert any(g.abs().sum() > 0 for g in grads), part


def test_deim_trains_with_mal_and_loss_settings_apply():
    targets = _random_targets(2)
    for arch, changes, term in [
        ("deim_rtdetrv2", {}, "loss_mal"),
        ("rtdetrv2", {"losses": LossSettings(cls_loss="mal")}, "loss_mal"),
        ("rtdetrv2", {}, "loss_vfl"),
    ]:
        _, (model, criterion, _) = _small(arch, **changes)
        losses = criterion(model.train()(torch.rand(2, 3, 160, 160), targets), targets)
        assert term in losses and all(torch.isfinite(v) for v in losses.values()), arch


def test_background_negatives_ride_on_the_denoising_branch():
    _, (model, criterion, _) = _small()
    set_denoising_negatives(model, 5)
    targets = _random_targets(2)
    out = model.train()(torch.rand(2, 3, 160, 160), targets)
    assert out["dn_negative_outputs"][0]["pred_logits"].shape == (2, 5, 3)
    losses = criterion(out, targets)
    assert "loss_vfl_neg_dn_2" in losses and torch.isfinite(losses["loss_vfl_neg_dn_2"])


def test_discrete_sampling_picks_the_reference_cell():
    value = [torch.arange(2 * 6, dtype=torch.float64).reshape(1, 1, 2, 6)]  # one head, 2 channels, 2x3 map
    locations = torch.tensor([[0.0, 0.0], [0.5, 0.9], [0.99, 0.1], [-0.3, 2.0]], dtype=torch.float64)
    locations = locations.reshape(1, 1, 1, 4, 2)  # (B, Q, heads, points, 2)
    weights = torch.eye(4, dtype=torch.float64).reshape(4, 1, 1, 1, 4)  # one point at a time
    picked = [deformable_sample(value, [[2, 3]], locations, w, [4], method="discrete") for w in weights]
    # cell = trunc(x * w + 0.5), trunc(y * h + 0.5), clamped: (0,0) (2,1) (2,0) (0,1) -> index y * 3 + x
    assert [p[0, 0, 0].item() for p in picked] == [0.0, 5.0, 2.0, 3.0]


def test_discrete_attention_model_trains_and_freezes_offsets():
    _, (model, criterion, _) = _small(arch_overrides={"cross_attn_method": "discrete"})
    attention = model.decoder.decoder.layers[0].cross_attn
    assert attention.method == "discrete" and not attention.sampling_offsets.weight.requires_grad
    targets = _random_targets(2)
    sum(criterion(model.train()(torch.rand(2, 3, 160, 160), targets), targets).values()).backward()
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 160, 160))
    assert torch.isfinite(out["pred_logits"]).all()


@pytest.mark.parametrize("img_size", [(160, 160), (128, 192)])
def test_other_input_sizes(img_size):
    _, (model, _, postprocessor) = _small(img_size=img_size)
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, *img_size))
        other = model(
            torch.rand(1, 3, 224, 288)
        )  # not the built size: anchors and embeddings made on the fly
    assert out["pred_logits"].shape == (2, 40, 3) and other["pred_boxes"].shape == (1, 40, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    detections = postprocessor(out, torch.tensor([[img_size[1], img_size[0]]] * 2))
    assert detections[0]["boxes"].shape == (40, 4) and detections[0]["labels"].max() < 3


def test_backbone_freezing_follows_official_configs():
    with torch.device("meta"):
        r50 = build(_spec("rtdetrv2", "r50")).model.backbone  # freeze_at 0, frozen norms
        deim_r50 = build(_spec("deim_rtdetrv2", "r50")).model.backbone  # everything trains
        r18 = build(_spec("rtdetrv2", "r18")).model.backbone
    assert not any(p.requires_grad for p in r50.conv1.parameters())
    assert all(p.requires_grad for p in r50.res_layers.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in r50.modules())
    for trainable in (deim_r50, r18):
        assert all(p.requires_grad for p in trainable.parameters())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trainable.modules())


def test_segmentation_is_refused_for_this_family():
    with pytest.raises(ConfigError, match="model.task=segment is not available for RT-DETRv2"):
        build(_spec("rtdetrv2", "r18", task="segment"))


def test_onnx_export_matches_torch(tmp_path):
    """The deployed model traces to ONNX (dynamic batch) and onnxruntime gives the torch detections."""
    ort = pytest.importorskip("onnxruntime")
    _, (model, _, postprocessor) = _small("deim_rtdetrv2")
    deployed = DeployModel(model, postprocessor).eval()
    images = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    sizes = torch.tensor([[320.0, 160.0], [160.0, 160.0]])
    names = ["images", "orig_target_sizes", "labels", "boxes", "scores"]
    with torch.no_grad():
        expected = [t.numpy() for t in deployed(images, sizes)]
        torch.onnx.export(
            deployed,
            (images, sizes),
            str(tmp_path / "model.onnx"),
            input_names=names[:2],
            output_names=names[2:],
            dynamic_axes={name: {0: "batch"} for name in names},
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (2, 1):
        got = session.run(
            None, {"images": images[:batch].numpy(), "orig_target_sizes": sizes[:batch].numpy()}
        )
        same, why = outputs_match(got, [e[:batch] for e in expected])
        assert same, why
