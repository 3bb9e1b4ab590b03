"""Numeric parity of our D-FINE / DEIM-D-FINE with the official models, plus API behaviour.

Parity follows tests/fixtures/parity/README procedure: build in float32 (80 classes, 640x640), load the
deterministic weights of tests/detinit.py (anchors/valid_mask keep the model's own values), switch to
float64, load the fixture BatchNorm statistics, then compare the eval forward, the postprocessor and the
train forward (no denoising queries) with the arrays the official code produced.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch

from src.models import build_model, build_postprocessor, get_size
from src.models.dfine.sizes import arch_overrides_from_state_dict
from src.models.hybrid_encoder import VGGBlock
from src.models.layers import ConvNormLayer
from tests.parity_data import (
    FIXTURES,
    ORIG_SIZES_WH,
    assert_matches_manifest,
    assert_outputs_match,
    assert_postprocessing_matches,
    parity_input,
    parity_targets,
    prepare_parity_model,
)

SIZES = ["n", "s", "m", "l", "x"]


def _fixture_prefix(variant: str) -> str:
    return "deim/deim" if variant == "deim" else "dfine"


def parity_model(size: str, variant: str = "dfine") -> torch.nn.Module:
    """Our model prepared exactly as the parity procedure says."""
    model = build_model(size, 80, img_size=(640, 640), variant=variant)
    return prepare_parity_model(model, FIXTURES / f"{_fixture_prefix(variant)}_{size}_bn_stats.npz")


@cache
def parity_run(size: str, variant: str) -> dict[str, np.ndarray]:
    """Eval, postprocessor and train outputs of the parity procedure (computed once per size)."""
    model = parity_model(size, variant)
    images = parity_input()
    model.eval()
    with torch.no_grad():
        out = model(images)
        post = build_postprocessor(80)(out, ORIG_SIZES_WH)
    result = {
        "eval_pred_logits": out["pred_logits"].numpy(),
        "eval_pred_boxes": out["pred_boxes"].numpy(),
        "post_labels": torch.stack([p["labels"] for p in post]).numpy(),
        "post_boxes_xyxy": torch.stack([p["boxes"] for p in post]).numpy(),
        "post_scores": torch.stack([p["scores"] for p in post]).numpy(),
    }
    model.train()
    model.decoder.num_denoising = 0
    with torch.no_grad():
        out = model(images, parity_targets())
    result["train_pred_logits"] = out["pred_logits"].numpy()
    result["train_pred_boxes"] = out["pred_boxes"].numpy()
    result["train_keys"] = np.array(sorted(out))
    return result


def _check_parity(size: str, variant: str) -> None:
    ours = parity_run(size, variant)
    expected = np.load(FIXTURES / f"{_fixture_prefix(variant)}_{size}_expected.npz")
    assert_outputs_match(ours, expected)
    assert_postprocessing_matches(build_postprocessor(80), expected, ours["post_scores"])


# The smallest size in the default run; every size with `-m slow`.
PARITY_SIZES = [size if size == "n" else pytest.param(size, marks=pytest.mark.slow) for size in SIZES]


@pytest.mark.parametrize("size", PARITY_SIZES)
def test_dfine_parity(size):
    _check_parity(size, "dfine")


@pytest.mark.parametrize("size", PARITY_SIZES)
def test_deim_parity(size):
    _check_parity(size, "deim")


def test_train_output_keys_match_official():
    keys = set(parity_run("n", "dfine")["train_keys"])
    assert keys == {
        "pred_logits",
        "pred_boxes",
        "pred_corners",
        "ref_points",
        "up",
        "reg_scale",
        "aux_outputs",
        "enc_aux_outputs",
        "pre_outputs",
        "enc_meta",
    }


@pytest.mark.parametrize(
    ("variant", "manifest"),
    [("dfine", "state_dict_manifest.json"), ("deim", "deim/deim_state_dict_manifest.json")],
)
def test_state_dict_matches_manifest(variant, manifest):
    expected = json.loads((FIXTURES / manifest).read_text())
    for size in SIZES:
        state = build_model(size, 80, img_size=(640, 640), variant=variant).state_dict()
        assert_matches_manifest(state, expected[size], f"{variant}-{size}")


def test_deploy_keeps_eval_outputs():
    model = parity_model("n").eval()
    images = parity_input()[:1]
    with torch.no_grad():
        before = model(images)
        model.deploy()
        after = model(images)
    assert len(model.decoder.decoder.layers) == model.decoder.eval_idx + 1
    folded = [m for m in model.encoder.modules() if isinstance(m, (VGGBlock, ConvNormLayer))]
    assert folded and all(hasattr(m, "conv_bn_fused") or hasattr(m, "conv") for m in folded)
    assert not any(hasattr(m, "norm") for m in folded)  # every RepVGG / conv-BN pair folded
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-9)


def _small_model(size="n", num_classes=3, img_size=(320, 320), **kwargs):
    torch.manual_seed(0)
    return build_model(size, num_classes, img_size=img_size, **kwargs)


def _random_targets(batch: int, num_classes: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(batch):
        n = 1 + i
        centres = torch.rand(n, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (n,), generator=generator),
                "boxes": torch.cat([centres, sizes], 1),
            }
        )
    return targets


@pytest.mark.parametrize("img_size", [(320, 320), (256, 384)])
def test_small_input_and_classes(img_size):
    model = _small_model(img_size=img_size, num_queries=50).eval()
    images = torch.rand(2, 3, *img_size)
    with torch.no_grad():
        out = model(images)
    assert out["pred_logits"].shape == (2, 50, 3)
    assert out["pred_boxes"].shape == (2, 50, 4)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()

    # Another input size than the one the model was built for: anchors/embeddings are made on the fly.
    with torch.no_grad():
        other = model(torch.rand(1, 3, 224, 288))
    assert other["pred_boxes"].shape == (1, 50, 4)

    detections = build_postprocessor(3, num_top_queries=20)(
        out, torch.tensor([[img_size[1], img_size[0]]] * 2)
    )
    assert len(detections) == 2
    assert detections[0]["labels"].max() < 3 and detections[0]["boxes"].shape == (20, 4)
    assert torch.all(detections[0]["scores"][:-1] >= detections[0]["scores"][1:])


def test_train_step_with_denoising_backpropagates():
    model = _small_model(num_queries=40, num_denoising=20).train()
    targets = _random_targets(2, 3)
    out = model(torch.rand(2, 3, 320, 320), targets)
    num_layers = get_size("n").num_layers
    assert out["pred_logits"].shape == (2, 40, 3)
    assert out["pred_corners"].shape == (2, 40, 4 * 33)
    assert len(out["aux_outputs"]) == num_layers - 1
    assert len(out["dn_outputs"]) == num_layers
    dn = out["dn_meta"]
    assert (
        dn["dn_num_split"][1] == 40 and out["dn_outputs"][0]["pred_boxes"].shape[1] == dn["dn_num_split"][0]
    )
    loss = (
        out["pred_logits"].sigmoid().mean()
        + out["pred_boxes"].mean()
        + out["dn_outputs"][-1]["pred_boxes"].mean()
    )
    loss.backward()
    grads = [
        p.grad for name, p in model.named_parameters() if p.requires_grad and "decoder.dec_bbox_head" in name
    ]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_train_without_boxes_runs():
    model = _small_model(num_queries=30, num_denoising=10).train()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = model(torch.rand(2, 3, 320, 320), empty)
    assert out["pred_logits"].shape == (2, 30, 3) and "dn_outputs" not in out


def test_float32_matches_float64():
    """With ordinary initialisation (not the chaotic parity weights) precision barely matters."""
    model = _small_model(num_queries=30).eval()
    images = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out32 = model(images)
        out64 = model.double()(images.double())
    torch.testing.assert_close(out32["pred_boxes"].double(), out64["pred_boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(
        out32["pred_logits"].double().sigmoid(), out64["pred_logits"].sigmoid(), rtol=0, atol=1e-4
    )


def test_deim_variant_changes_activations_only_where_official():
    dfine, deim = _small_model("l", variant="dfine"), _small_model("l", variant="deim")
    assert type(dfine.decoder.decoder.layers[0].activation).__name__ == "ReLU"
    assert type(deim.decoder.decoder.layers[0].activation).__name__ == "SiLU"
    assert type(deim.decoder.query_pos_head.act).__name__ == "SiLU"
    assert type(deim.decoder.decoder.lqe_layers[0].reg_conf.act).__name__ == "SiLU"
    assert (
        type(deim.encoder.fpn_blocks[0].cv1.act).__name__
        == type(dfine.encoder.fpn_blocks[0].cv1.act).__name__
    )
    assert "backbone.stem.stem1.bn.num_batches_tracked" in deim.state_dict()
    assert "backbone.stem.stem1.bn.num_batches_tracked" not in dfine.state_dict()
    with pytest.raises(ValueError, match="variant"):
        build_model("n", 3, variant="rtdetr")


def test_arch_overrides_from_checkpoint_shapes():
    wide = build_model("s", 5, img_size=(320, 320), arch_overrides={"decoder_ffn_dim": 1024})
    overrides = arch_overrides_from_state_dict(wide.state_dict())
    assert overrides["decoder_ffn_dim"] == 1024 and overrides["use_lab"] and not overrides["freeze_norm"]
    rebuilt = build_model("s", 5, img_size=(320, 320), arch_overrides=overrides)
    rebuilt.load_state_dict(wide.state_dict())  # strict: same keys and shapes
    with pytest.raises(ValueError, match="override"):
        build_model("s", 5, arch_overrides={"no_such_field": 1})


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="size"):
        build_model("q", 3)
    with pytest.raises(ValueError, match="multiples of 32"):
        build_model("n", 3, img_size=(300, 320))
    with pytest.raises(ValueError, match="too small"), torch.no_grad():
        build_model("n", 3, img_size=(64, 64), num_queries=300).eval()(torch.rand(1, 3, 64, 64))


def test_backbone_freezing_follows_official_configs():
    large = _small_model("l")  # freeze_at 0, freeze_norm: stem frozen, every backbone BN frozen
    assert not any(p.requires_grad for p in large.backbone.stem.parameters())
    assert all(p.requires_grad for p in large.backbone.stages.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in large.backbone.modules())
    nano = _small_model("n")  # freeze_at -1, ordinary BN
    assert all(p.requires_grad for p in nano.backbone.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in nano.backbone.modules())


def test_postprocessor_deploy_mode_traces():
    post = build_postprocessor(3, num_top_queries=10).deploy()
    outputs = {"pred_logits": torch.randn(2, 20, 3), "pred_boxes": torch.rand(2, 20, 4)}
    sizes = torch.tensor([[320, 240], [640, 480]])
    traced = torch.jit.trace(
        lambda logits, boxes, wh: post({"pred_logits": logits, "pred_boxes": boxes}, wh),
        (outputs["pred_logits"], outputs["pred_boxes"], sizes),
    )
    labels, boxes, scores = traced(outputs["pred_logits"], outputs["pred_boxes"], sizes)
    expected = build_postprocessor(3, num_top_queries=10)(outputs, sizes)
    torch.testing.assert_close(boxes[1], expected[1]["boxes"])
    assert torch.equal(labels[0], expected[0]["labels"]) and scores.shape == (2, 10)


def test_pretrained_backbone_from_local_file(tmp_path):
    source = _small_model("n").backbone
    state = {
        k: v + 0.5 if v.is_floating_point() else v for k, v in source.state_dict().items() if ".lab." not in k
    }
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    torch.save(state, path)
    model = build_model("n", 3, img_size=(320, 320), pretrained_backbone=path)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert loaded["stem.stem1.lab.scale"].item() == 1.0  # absent from the file: identity LAB kept
    torch.save({"stem.unknown.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="does not fit"):
        build_model("n", 3, img_size=(320, 320), pretrained_backbone=tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        build_model("n", 3, img_size=(320, 320), pretrained_backbone=tmp_path / "missing.pth")
