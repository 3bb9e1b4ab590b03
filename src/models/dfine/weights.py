"""D-FINE's released weights (where they are, what they are called) and telling D-FINE from DEIM-D-FINE
weights apart.

`find_pretrained` locates (or downloads once) the released files under pretrained/ (see its README.md).
`dfine_arch_of` reads the arch (dfine | deim_dfine) off a D-FINE-family state dict where it can.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import torch
from loguru import logger

from src.common.io import atomic_write
from src.models.backbones.hgnetv2 import ARCHS
from src.models.dfine.sizes import SIZES, arch_overrides_from_state_dict

# Official release files (README of Peterande/D-FINE); DEIM publishes on Google Drive (no direct download).
DFINE_RELEASE_URL = "https://github.com/Peterande/storage/releases/download/dfinev1.0/"
DFINE_RELEASE_FILES = {
    **{(size, "coco"): f"dfine_{size}_coco.pth" for size in "nsmlx"},
    **{(size, "obj365"): f"dfine_{size}_obj365.pth" for size in "smlx"},
    **{(size, "obj2coco"): f"dfine_{size}_obj2coco.pth" for size in "smx"},
    ("l", "obj2coco"): "dfine_l_obj2coco_e25.pth",  # the release's best L Objects365+COCO model
}
DEIM_DRIVE_LINKS = {
    ("n", "coco"): "https://drive.google.com/file/d/1ZPEhiU9nhW4M5jLnYOFwTSLQC1Ugf62e/view",
    ("s", "coco"): "https://drive.google.com/file/d/1tB8gVJNrfb6dhFvoHJECKOF5VpkthhfC/view",
    ("m", "coco"): "https://drive.google.com/file/d/18Lj2a6UN6k_n_UzqnJyiaiLGpDzQQit8/view",
    ("l", "coco"): "https://drive.google.com/file/d/1PIRf02XkrA2xAD3wEiKE2FaamZgSGTAr/view",
    ("x", "coco"): "https://drive.google.com/file/d/1dPtbgtGgq1Oa7k_LgH1GXPelg1IVeu0j/view",
    ("x", "obj365"): "https://drive.google.com/file/d/1RMNrHh3bYN0FfT5ZlWhXtQxkG23xb2xj/view",
}
DOWNLOAD_TIMEOUT_S = 20  # per network operation: fail fast when offline, never on a slow but live link


def pretrained_filename(model_name: str, dataset: str = "coco", variant: str = "dfine") -> str:
    """The file name find_pretrained looks for under pretrained/."""
    if variant == "deim":
        return f"deim_dfine_hgnetv2_{model_name}_{dataset}.pth"
    return f"dfine_{model_name}_{dataset}.pth"


def find_pretrained(
    model_name: str,
    dataset: str = "coco",
    variant: str = "dfine",
    pretrained_dir: str | Path = "pretrained",
    download: bool = True,
) -> Path:
    """Path of the released weights for size `model_name` trained on `dataset` (coco | obj365 | obj2coco).

    Looks in `pretrained_dir` first; an official D-FINE file that is absent is downloaded once from the
    GitHub release. DEIM files live on Google Drive: the error says where to get them and where to put them.
    """
    if variant not in ("dfine", "deim"):
        raise ValueError(f"variant must be 'dfine' or 'deim', got {variant!r}")
    path = Path(pretrained_dir) / pretrained_filename(model_name, dataset, variant)
    if path.is_file():
        return path
    release = DFINE_RELEASE_FILES if variant == "dfine" else DEIM_DRIVE_LINKS
    if (model_name, dataset) not in release:
        available = ", ".join(f"{size}/{data}" for size, data in release)
        raise ValueError(
            f"No released {variant} weights for size {model_name!r} on {dataset!r}; available: {available}"
        )
    if variant == "deim":
        raise FileNotFoundError(
            f"DEIM-D-FINE-{model_name.upper()} {dataset} weights not found at {path.resolve()}.\n"
            f"DEIM publishes them on Google Drive: {DEIM_DRIVE_LINKS[(model_name, dataset)]}\n"
            f"Download the file there and save it exactly as {path.resolve()} (see pretrained/README.md)."
        )
    url = DFINE_RELEASE_URL + DFINE_RELEASE_FILES[(model_name, dataset)]
    if download:
        try:
            return _download(url, path)
        except OSError as error:
            reason = f"the download from {url} failed ({error})"
    else:
        reason = "downloading is switched off"
    raise FileNotFoundError(
        f"D-FINE-{model_name.upper()} {dataset} weights not found at {path.resolve()} and {reason}.\n"
        f"Download {url} on a machine with internet and save it exactly as {path.resolve()} "
        "(see pretrained/README.md), or train from scratch (train.pretrained_model_path=null)."
    )


def _download(url: str, path: Path) -> Path:
    logger.info(f"Downloading {url} -> {path}")

    def fetch(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)

    atomic_write(path, fetch)  # a broken download never leaves a half file under the final name
    return path


def dfine_arch_of(state: Mapping[str, torch.Tensor], file_name: str) -> tuple[str | None, str]:
    """(arch, reason): "dfine" or "deim_dfine" when the weights (or the file name) show which, else
    (None, why not).

    Evidence, strongest first:
    1. frozen BatchNorm in the backbone (running stats without num_batches_tracked) is official D-FINE L/X:
       DEIM trains every BatchNorm, so ordinary BatchNorm in an L/X-size backbone is DEIM;
    2. a file name containing "deim" (the DEIM release names do), or an official D-FINE release name.
    Official n/s/m files of the two have the same tensors (they differ only in the decoder activation,
    ReLU vs SiLU): without a telling name there is no way to know.
    """
    frozen_norm = arch_overrides_from_state_dict(state).get("freeze_norm")
    if frozen_norm:
        return "dfine", "frozen BatchNorm in the backbone (official D-FINE L/X; DEIM trains every BatchNorm)"
    if frozen_norm is False and _is_large_backbone(state):
        return "deim_dfine", "trained BatchNorm in an L/X backbone (DEIM; official D-FINE L/X freeze it)"
    if "deim" in file_name:
        return "deim_dfine", f"the file name {file_name!r} contains 'deim'"
    dfine_names = set(DFINE_RELEASE_FILES.values()) | {
        pretrained_filename(*key) for key in DFINE_RELEASE_FILES
    }
    if file_name in dfine_names:
        return "dfine", f"{file_name!r} is an official D-FINE release file name"
    return None, (
        "D-FINE and DEIM-D-FINE cannot be told apart from this file: their n/s/m checkpoints have the same "
        "tensors (only the decoder activation differs, ReLU vs SiLU)"
    )


def _is_large_backbone(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the HGNetv2 backbones of sizes l and x (their last stage has more channels than n/s/m's)."""

    def widest(backbone: str) -> int:
        return ARCHS[backbone][1][-1].out_channels

    smaller = max(widest(SIZES[size].backbone) for size in "nsm")
    channels = [
        int(tensor.shape[0])
        for key, tensor in state.items()
        if key.startswith("backbone.") and key.endswith(".weight") and tensor.ndim == 4
    ]
    return bool(channels) and max(channels) > smaller
