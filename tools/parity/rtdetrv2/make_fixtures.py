"""Parity fixtures for RT-DETRv2 and DEIM-RT-DETRv2, written by the unmodified official code.

Run with a Python that has the official code's needs (see README.md next to this file):

    official-venv/bin/python tools/parity/rtdetrv2/make_fixtures.py \
        --official /path/to/DEIM --out tests/fixtures/parity/rtdetrv2

For every size of both archs it builds the official model from its YAML config (80 classes, 640x640),
loads the deterministic weights of tests/detinit.py, casts to float64, calibrates the BatchNorm
statistics on the input, and writes the state-dict manifest, the eval / postprocessor / train outputs
and every loss term of the official criterion. It also writes the key/shape manifest of the ImageNet
ResNet-vd file each backbone depth starts from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from tests.detinit import deterministic_state_dict  # noqa: E402

PARITY = REPO / "tests" / "fixtures" / "parity"
ORIG_SIZES_WH = [[640, 480], [1280, 720]]
# Our size name -> the config file stem of each arch in configs/deim_rtdetrv2/.
CONFIGS = {
    "rtdetrv2": {
        "r18": "rtdetrv2_r18vd_120e_coco",
        "r34": "rtdetrv2_r34vd_120e_coco",
        "r50m": "rtdetrv2_r50vd_m_7x_coco",
        "r50": "rtdetrv2_r50vd_6x_coco",
        "r101": "rtdetrv2_r101vd_6x_coco",
    },
    "deim_rtdetrv2": {
        "r18": "deim_r18vd_120e_coco",
        "r34": "deim_r34vd_120e_coco",
        "r50m": "deim_r50vd_m_60e_coco",
        "r50": "deim_r50vd_60e_coco",
        "r101": "deim_r101vd_60e_coco",
    },
}
BACKBONE_DEPTHS = (18, 34, 50, 101)


class Official:
    """The official package imported from a checkout (its modules register themselves on import)."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        sys.path.insert(0, str(self.root))
        from engine.backbone.common import FrozenBatchNorm2d
        from engine.backbone.presnet import PResNet
        from engine.core import YAMLConfig

        self.yaml_config, self.presnet, self.frozen_bn = YAMLConfig, PResNet, FrozenBatchNorm2d

    def build(self, config_stem: str):
        """Model, criterion and postprocessor of one config (float32; no ImageNet download)."""
        path = self.root / "configs" / "deim_rtdetrv2" / f"{config_stem}.yml"
        cfg = self.yaml_config(str(path), PResNet={"pretrained": False})
        return cfg.model, cfg.criterion, cfg.postprocessor


def apply_deterministic_weights(model: torch.nn.Module) -> None:
    state = model.state_dict()
    skip = {k for k in state if k.endswith("anchors") or k.endswith("valid_mask")}
    model.load_state_dict(deterministic_state_dict(state, skip))


def norm_layers(model: torch.nn.Module, frozen_bn_type) -> dict[str, torch.nn.Module]:
    """Every BatchNorm-like layer (trainable or frozen) by its state-dict prefix."""
    kinds = (torch.nn.BatchNorm2d, frozen_bn_type)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


@torch.no_grad()
def calibrate_norms(model: torch.nn.Module, images: torch.Tensor, frozen_bn_type) -> dict[str, np.ndarray]:
    """Set each norm layer's running stats to the statistics of its own input in one eval forward.

    Hooks fire in execution order, so every layer sees the output of already calibrated layers; the
    deterministic weights alone would blow activations up through 100 layers.
    """

    def set_stats(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    layers = norm_layers(model, frozen_bn_type)
    handles = [m.register_forward_pre_hook(set_stats) for m in layers.values()]
    model.eval()
    model(images)
    for handle in handles:
        handle.remove()
    stats = {}
    for name, m in layers.items():
        stats[f"{name}.running_mean"] = m.running_mean.numpy().copy()
        stats[f"{name}.running_var"] = m.running_var.numpy().copy()
    return stats


def load_inputs() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images = torch.from_numpy(np.load(PARITY / "input_uint8.npy").astype(np.float64) / 255.0)
    raw = json.loads((PARITY / "targets.json").read_text())
    targets = [
        {
            "labels": torch.tensor(t["labels"], dtype=torch.int64),
            "boxes": torch.tensor(t["boxes_cxcywh"], dtype=torch.float64),
        }
        for t in raw
    ]
    return images, targets


@torch.no_grad()
def eval_outputs(model, postprocessor, images) -> dict[str, np.ndarray]:
    model.eval()
    out = model(images)
    post = postprocessor(out, torch.tensor(ORIG_SIZES_WH))
    return {
        "eval_pred_logits": out["pred_logits"].numpy(),
        "eval_pred_boxes": out["pred_boxes"].numpy(),
        "post_labels": torch.stack([p["labels"] for p in post]).numpy(),
        "post_boxes_xyxy": torch.stack([p["boxes"] for p in post]).numpy(),
        "post_scores": torch.stack([p["scores"] for p in post]).numpy(),
    }


@torch.no_grad()
def train_outputs_and_losses(model, criterion, images, targets) -> tuple[dict[str, np.ndarray], dict]:
    model.train()
    model.decoder.num_denoising = 0
    out = model(images, targets)
    losses = {k: float(v) for k, v in sorted(criterion(out, targets).items())}
    arrays = {"train_pred_logits": out["pred_logits"].numpy(), "train_pred_boxes": out["pred_boxes"].numpy()}
    return arrays, losses


def shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in state.items()}


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def make_model_fixtures(official: Official, arch: str, size: str, out: Path) -> dict:
    torch.manual_seed(0)
    model, criterion, postprocessor = official.build(CONFIGS[arch][size])
    manifest = shapes(model.state_dict())
    apply_deterministic_weights(model)
    model.double()
    images, targets = load_inputs()
    stats = calibrate_norms(model, images, official.frozen_bn)
    expected = eval_outputs(model, postprocessor, images)
    train_arrays, losses = train_outputs_and_losses(model, criterion, images, targets)
    np.savez(out / f"{arch}_{size}_bn_stats.npz", **stats)
    np.savez(out / f"{arch}_{size}_expected.npz", **expected, **train_arrays)
    write_json(out / f"{arch}_{size}_losses.json", losses)
    print(f"{arch} {size}: {len(manifest)} keys, {len(stats) // 2} norms, losses {len(losses)}", flush=True)
    return manifest


def backbone_manifest(presnet_type) -> dict[str, dict[str, list[int]]]:
    """Keys and shapes the official PResNet(pretrained=True) loads from the paddle-converted files.

    The loader runs after the norms are frozen, and FrozenBatchNorm2d has no num_batches_tracked, so
    the files hold exactly the frozen model's keys (a trainable-norm model fills that counter itself).
    """
    return {
        str(depth): shapes(presnet_type(depth, variant="d", freeze_norm=True, pretrained=False).state_dict())
        for depth in BACKBONE_DEPTHS
    }


def run_in_fresh_process(official: Path, arch: str, size: str, out: Path) -> dict:
    """One model per process: the official config loader keeps keys of every file loaded before in the
    same process (a mutable default argument), so a second config would inherit the first's settings."""
    command = [sys.executable, __file__, "--official", str(official), "--out", str(out), "--one", arch, size]
    subprocess.run(command, check=True)
    manifest_path = out / f".{arch}_{size}_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.unlink()
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of Intellindust-AI-Lab/DEIM")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", choices=sorted(CONFIGS), action="append", help="default: both")
    parser.add_argument("--size", action="append", help="default: all five")
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        arch, size = args.one
        manifest = make_model_fixtures(Official(args.official), arch, size, args.out)
        write_json(args.out / f".{arch}_{size}_manifest.json", manifest)
        return
    for arch in args.arch or sorted(CONFIGS):
        manifest_path = args.out / f"{arch}_state_dict_manifest.json"
        manifests = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        for size in args.size or list(CONFIGS[arch]):
            manifests[size] = run_in_fresh_process(args.official, arch, size, args.out)
        write_json(manifest_path, manifests)
    write_json(
        args.out / "presnet_backbone_manifest.json", backbone_manifest(Official(args.official).presnet)
    )


if __name__ == "__main__":
    main()
