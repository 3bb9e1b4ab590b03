"""Where DETR's released COCO files are (facebookresearch/detr README). Nothing is downloaded for training:
a missing file is refused with its address (src/dl/train/run.py)."""

from __future__ import annotations

_RELEASE_URL = "https://dl.fbaipublicfiles.com/detr/"
# file name -> download address: r50, r101, r50_dc5, r101_dc5
RELEASE_FILES = {
    name: _RELEASE_URL + name
    for name in (
        "detr-r50-e632da11.pth",
        "detr-r101-2c7b67e5.pth",
        "detr-r50-dc5-f0fb7ef5.pth",
        "detr-r101-dc5-a2e86def.pth",
    )
}
