"""Write the DETR parity fixtures by running the unmodified official DETR code.

Run with a Python that has the official code's needs (torch, torchvision, scipy, pycocotools):

    official-venv/bin/python tools/parity/detr/make_fixtures.py --official /path/to/detr \
        --out tests/fixtures/parity/detr

For each size (r50, r101, r50_dc5, r101_dc5) the official model is built from the official builders with
the official defaults (main.get_args_parser) and 80 classes, given the deterministic weights of
tests/detinit.py, cast to float64, its FrozenBatchNorm statistics calibrated on the parity input, and then
run in eval mode, through the official PostProcess, in train mode (dropout 0) and through the official
SetCriterion. README.md next to this file lists the files and the one patch (no ImageNet download).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT))
from tests.detinit import deterministic_state_dict  # noqa: E402

PINNED_COMMIT = "29901c51d7fe8712168b8d0d64351170bc0f83e0"
SIZES = {
    "r50": ("resnet50", False),
    "r101": ("resnet101", False),
    "r50_dc5": ("resnet50", True),
    "r101_dc5": ("resnet101", True),
}
NUM_CLASSES = 80
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The spec's original sizes are (w, h); DETR's PostProcess takes (h, w).
ORIG_SIZES_WH = [[640, 480], [1280, 720]]


def official_commit(official: Path) -> str:
    result = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown (not a git checkout)"


def import_official(official: Path):
    """The official modules, imported from the checkout as its own scripts import them."""
    sys.path.insert(0, str(official))
    import main as official_main

    from models import backbone, detr, matcher, transformer

    return official_main, backbone, detr, matcher, transformer


@contextlib.contextmanager
def resnet_without_imagenet_weights(torchvision_models):
    """Official Backbone asks torchvision for ImageNet weights (`pretrained=is_main_process()`), which
    cannot be downloaded here and are overwritten by the deterministic weights anyway: for the duration
    of the build, torchvision.models.resnet50/101 ignore `pretrained` and build with weights=None.
    torchvision_models: the official backbone module's own `torchvision.models` (this script never
    imports torchvision: only the official code, in its own venv, does)."""
    originals = {name: getattr(torchvision_models, name) for name in ("resnet50", "resnet101")}

    def without_weights(factory):
        def build(*args, pretrained=False, **kwargs):
            return factory(*args, weights=None, **kwargs)

        return build

    for name, factory in originals.items():
        setattr(torchvision_models, name, without_weights(factory))
    try:
        yield
    finally:
        for name, factory in originals.items():
            setattr(torchvision_models, name, factory)


def official_args(official_main, size: str, dropout: float) -> argparse.Namespace:
    backbone_name, dilation = SIZES[size]
    args = official_main.get_args_parser().parse_args([])
    args.backbone, args.dilation, args.dropout, args.device = backbone_name, dilation, dropout, "cpu"
    return args


def build_official(modules, size: str, dropout: float):
    """DETR exactly as the official `models.detr.build` assembles it, with 80 classes (81 logits)."""
    official_main, backbone, detr, matcher, transformer = modules
    args = official_args(official_main, size, dropout)
    with resnet_without_imagenet_weights(backbone.torchvision.models):
        model = detr.DETR(
            backbone.build_backbone(args),
            transformer.build_transformer(args),
            num_classes=NUM_CLASSES,
            num_queries=args.num_queries,
            aux_loss=args.aux_loss,
        )
    last_layer = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    weight_dict = dict(last_layer)
    for i in range(args.dec_layers - 1):
        weight_dict.update({f"{k}_{i}": v for k, v in last_layer.items()})
    criterion = detr.SetCriterion(
        NUM_CLASSES,
        matcher=matcher.build_matcher(args),
        weight_dict=weight_dict,
        eos_coef=args.eos_coef,
        losses=["labels", "boxes", "cardinality"],
    )
    return model, criterion, detr.PostProcess(), args


def normalised_input(input_path: Path) -> torch.Tensor:
    """What the official model sees: ImageNet-normalised x/255 in float64 (2, 3, 640, 640)."""
    images = torch.from_numpy(np.load(input_path).astype(np.float64) / 255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
    return (images - mean) / std


def nested(images: torch.Tensor):
    from util.misc import NestedTensor

    no_padding = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
    return NestedTensor(images, no_padding)


def calibrate_frozen_bn(model, frozen_bn_class, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Set each FrozenBatchNorm's running mean/var to the statistics of its input, in forward order
    (a pre-hook fires before the layer normalises), so eval activations stay O(1)."""

    def set_stats(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    hooks = [
        m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, frozen_bn_class)
    ]
    model.eval()
    with torch.no_grad():
        model(nested(images))
    for hook in hooks:
        hook.remove()
    return {
        key: value.numpy().copy()
        for key, value in model.state_dict().items()
        if key.endswith(("running_mean", "running_var"))
    }


def outputs_arrays(prefix: str, out: dict, with_aux: bool) -> dict[str, np.ndarray]:
    arrays = {
        f"{prefix}_pred_logits": out["pred_logits"].numpy(),
        f"{prefix}_pred_boxes": out["pred_boxes"].numpy(),
    }
    if with_aux:
        arrays[f"{prefix}_aux_pred_logits"] = torch.stack(
            [a["pred_logits"] for a in out["aux_outputs"]]
        ).numpy()
        arrays[f"{prefix}_aux_pred_boxes"] = torch.stack(
            [a["pred_boxes"] for a in out["aux_outputs"]]
        ).numpy()
    return arrays


def load_targets(path: Path) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "labels": torch.tensor(t["labels"], dtype=torch.int64),
            "boxes": torch.tensor(t["boxes_cxcywh"], dtype=torch.float64),
        }
        for t in json.loads(path.read_text())
    ]


def make_size(modules, size: str, images: torch.Tensor, targets, out_dir: Path) -> dict[str, list[int]]:
    model, _, postprocess, _ = build_official(modules, size, dropout=0.1)
    model.load_state_dict(deterministic_state_dict(model.state_dict()))
    model.double()
    stats = calibrate_frozen_bn(model, modules[1].FrozenBatchNorm2d, images)
    np.savez_compressed(out_dir / f"detr_{size}_bn_stats.npz", **stats)
    state = model.state_dict()

    model.eval()
    with torch.no_grad():
        eval_out = model(nested(images))
        orig_sizes_hw = torch.tensor(ORIG_SIZES_WH)[:, [1, 0]]
        post = postprocess(eval_out, orig_sizes_hw)
    expected = outputs_arrays("eval", eval_out, with_aux=False)
    for key in ("labels", "boxes", "scores"):
        name = "post_boxes_xyxy" if key == "boxes" else f"post_{key}"
        expected[name] = torch.stack([p[key] for p in post]).numpy()

    # Train mode with dropout 0 through the official constructor argument: the same weights, no randomness.
    train_model, criterion, _, _ = build_official(modules, size, dropout=0.0)
    train_model.double()
    train_model.load_state_dict(state)
    train_model.train()
    criterion.double()  # its no-object weight buffer (eos_coef) is float32 as built
    with torch.no_grad():
        train_out = train_model(nested(images))
        losses = {k: float(v) for k, v in criterion(train_out, targets).items()}
    expected.update(outputs_arrays("train", train_out, with_aux=True))
    expected["input_mean"] = np.array(IMAGENET_MEAN)
    expected["input_std"] = np.array(IMAGENET_STD)
    np.savez_compressed(out_dir / f"detr_{size}_expected.npz", **expected)

    weights = criterion.weight_dict
    report = {
        "weight_dict": weights,
        "weighted": {k: losses[k] * weights[k] for k in sorted(weights)},
        "unweighted": dict(sorted(losses.items())),
    }
    (out_dir / f"detr_{size}_losses.json").write_text(json.dumps(report, indent=1) + "\n")
    return {key: list(value.shape) for key, value in state.items()}


def torchvision_resnet_manifest(torchvision_models) -> dict[str, dict[str, list[int]]]:
    """Key -> shape of torchvision's ImageNet ResNet-50/101 state dicts (what DETR's backbone starts from);
    built without weights (same keys and shapes as the ImageNet files) by the official backbone module's
    `torchvision.models`."""
    return {
        name: {
            k: list(v.shape) for k, v in getattr(torchvision_models, name)(weights=None).state_dict().items()
        }
        for name in ("resnet50", "resnet101")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of facebookresearch/detr")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures/parity/detr")
    parser.add_argument("--input", type=Path, default=REPO_ROOT / "tests/fixtures/parity/input_uint8.npy")
    parser.add_argument("--targets", type=Path, default=REPO_ROOT / "tests/fixtures/parity/targets.json")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()

    commit = official_commit(args.official)
    if commit != PINNED_COMMIT:
        print(f"warning: official checkout is at {commit}, the fixtures are pinned to {PINNED_COMMIT}")
    modules = import_official(args.official.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    images, targets = normalised_input(args.input), load_targets(args.targets)

    manifest_path = args.out / "state_dict_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for size in args.sizes:
        print(f"{size} ...", flush=True)
        manifest[size] = make_size(modules, size, images, targets, args.out)
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=0) + "\n")
    (args.out / "torchvision_resnet_manifest.json").write_text(
        json.dumps(torchvision_resnet_manifest(modules[1].torchvision.models), indent=0) + "\n"
    )
    info = {
        "official_commit": commit,
        "torch": torch.__version__,
        "torchvision": modules[1].torchvision.__version__,
        "orig_sizes_wh": ORIG_SIZES_WH,
        "num_classes": NUM_CLASSES,
    }
    (args.out / "provenance.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
