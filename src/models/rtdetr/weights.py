"""Where RT-DETRv2's released files are: the COCO detectors (lyuwenyu/RT-DETR, rtdetrv2_pytorch README) and
the ImageNet ResNet-vd backbones its training starts from (src/models/backbones/presnet.py). Nothing is
downloaded for training: a missing file is refused with its address (src/dl/train/run.py)."""

from __future__ import annotations

from src.models.backbones.presnet import PRETRAINED_FILES, PRETRAINED_URL

_STORAGE = "https://github.com/lyuwenyu/storage/releases/download/"
# file name -> download address, by size: r18 r34 r50m r50 r101 (DEIM-RT-DETRv2's are on Google Drive).
RELEASE_FILES = {
    "rtdetrv2_r18vd_120e_coco_rerun_48.1.pth": _STORAGE + "v0.2/rtdetrv2_r18vd_120e_coco_rerun_48.1.pth",
    "rtdetrv2_r34vd_120e_coco_ema.pth": _STORAGE + "v0.1/rtdetrv2_r34vd_120e_coco_ema.pth",
    "rtdetrv2_r50vd_m_7x_coco_ema.pth": _STORAGE + "v0.1/rtdetrv2_r50vd_m_7x_coco_ema.pth",
    "rtdetrv2_r50vd_6x_coco_ema.pth": _STORAGE + "v0.1/rtdetrv2_r50vd_6x_coco_ema.pth",
    "rtdetrv2_r101vd_6x_coco_from_paddle.pth": _STORAGE + "v0.1/rtdetrv2_r101vd_6x_coco_from_paddle.pth",
}
IMAGENET_FILES = {name: PRETRAINED_URL.format(file=name) for name in PRETRAINED_FILES.values()}
