"""Training / evaluation data: split CSVs + YOLO labels -> network-input tensors and targets.

    settings = DataSettings.from_config(cfg)                   # the stage reads the config (settings.py)
    datasets = build_datasets(settings, {"train": paths, "val": ...})   # split -> image paths (setup.py)
    for epoch in range(epochs):
        datasets["train"].set_epoch(epoch)   # mosaic/mixup windows, no-aug tail, background-ignoring (len)
        loader = DataLoader(datasets["train"], sampler=..., collate_fn=build_collate(settings, train=True))
        for images, targets in loader:       # images (B, 3, h, w) float in [0, 1]; targets: list of dicts
            ...

Build the DataLoader after set_epoch (its workers copy the dataset's state when they start).

One sample's target: labels int64 (n,), boxes float32 (n, 4) normalised cxcywh in the network input,
image_id (int, stable index in its split), orig_size int64 tensor (w, h), letterbox (preprocess.Letterbox:
maps network pixels back to the original image), path (str), mosaic (bool), mixup (bool). For training
samples orig_size and letterbox describe the augmented picture (a mosaic canvas, a rotated image, a mixup
blend); for val/test the original.
model.task=segment adds masks bool (n, h, w) at the network input size and has_mask bool (n,) (False: a
box-only object, allowed by train.allow_box_only); an augmented sample's boxes are its masks' boxes (objects
whose mask vanished are dropped), an unaugmented one also carries polygons (its label polygons, normalised
in the original image: evaluation's ground-truth masks). Detection datasets rasterise nothing.
Geometry comes from src.common.network_input, the same as at inference; augmentations from src.dl.train.augment.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch.utils.data import Dataset

from src.common.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from src.common.draw import draw_detections, draw_masks, save_image_rgb
from src.common.errors import UserError
from src.common.hardware import cpu_count
from src.common.images import read_image_rgb
from src.common.masks import polygons_has_mask, polygons_to_masks
from src.common.network_input import (
    Letterbox,
    boxes_xyxy_to_network,
    image_to_tensor,
    letterbox_or_resize,
)
from src.dl.train.augment import (
    MIXUP_RATIO_RANGE,
    MosaicParams,
    Sample,
    apply_augmentations,
    build_augmentations,
    fit_boxes_to_masks,
    letterbox_masks,
    make_mosaic,
    mix_up,
    polygons_to_network,
)
from src.dl.train.cache import (
    ImageCache,
    build_image_cache,
    cache_mode,
    check_cache_fits,
    fit_image,
    from_original,
)
from src.dl.train.settings import DataSettings
from src.etl.labels import label_path_for, labels_dir
from src.etl.splits import load_labels

MULTISCALE_STEPS = (-2, -1, 1, 2)  # multiscale batch sizes: img_size + k * 32 on both sides


# ---------------------------------------------------------------- dataset


def sample_seed(*parts: int | str) -> int:
    """A stable 32-bit seed from (seed, epoch, index, ...): the same augmentation for the same sample and
    epoch whatever the number of workers, and different workers never repeat each other."""
    return zlib.crc32(repr(parts).encode())


def check_box_only(
    image_paths: list[Path], polygons: list[list], data_path: Path, split: str, allow: bool
) -> None:
    """A segmentation run needs a polygon for every object: label files with box lines are refused (one
    line naming them) unless train.allow_box_only, which trains those objects without mask loss."""
    files = [
        path for path, objects in zip(image_paths, polygons, strict=True) if any(p is None for p in objects)
    ]
    if not files:
        return
    folder = labels_dir(data_path)
    names = [str(label_path_for(path, folder)) for path in files[:3]]
    listed = ", ".join(names) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    if not allow:
        raise UserError(
            f"model.task=segment: {len(files)} {split} label file(s) have box-only objects (no polygon): "
            f"{listed}; add polygons, or set train.allow_box_only=true to train them without mask loss"
        )
    logger.info(
        f"{split}: {len(files)} label file(s) with box-only objects (no mask loss for them): {listed}"
    )


def mixup_window(epochs) -> tuple[int, float]:
    """train.mixup.epochs [start, end) -> (start, end); a null end (or no list at all) means no end."""
    if epochs is None:
        return 0, math.inf
    if isinstance(epochs, (str, int, float)) or len(epochs) != 2:
        raise ValueError(f"train.mixup.epochs must be [start, end] (end may be null), got {epochs}")
    start, end = epochs
    return int(start or 0), math.inf if end is None else int(end)


class DetectionDataset(Dataset):
    """One split. Training mode adds albumentations, mosaic and mixup (each in its epochs), background-ignoring
    epochs, and a final stretch of epochs without any augmentation (train.no_aug_epochs, as in DEIM)."""

    def __init__(
        self, settings: DataSettings, split: str, image_paths: Sequence[Path], train: bool | None = None
    ) -> None:
        """image_paths: the split's images (src/dl/train/setup.py reads them from its CSV); train: augment
        (default: split == "train")."""
        self.split = split
        self.train = split == "train" if train is None else train
        self.img_size, self.keep_ratio = settings.img_size, settings.keep_ratio  # (h, w)
        self.use_one_class = settings.use_one_class
        self.label_names = list(settings.label_names)
        self.class_names = ["object"] if self.use_one_class else self.label_names
        self.seed = settings.seed
        self.image_paths = list(image_paths)
        self.boxes, self.class_ids, self.polygons = load_labels(
            self.image_paths, settings.data_path, len(self.label_names), settings.clip_tolerance
        )
        self.segment = settings.segment  # masks from the polygons; detection rasterises nothing
        if self.segment:
            check_box_only(
                self.image_paths, self.polygons, settings.data_path, split, settings.allow_box_only
            )
        self.transform = build_augmentations(settings.augs) if self.train else None
        self.mosaic_prob = float(settings.mosaic["prob"]) if self.train else 0.0
        self.mosaic_params = MosaicParams.from_mapping(settings.mosaic)
        self.mosaic_until_epoch = settings.epochs - int(settings.mosaic["no_mosaic_epochs"])
        self.no_aug_epochs = settings.no_aug_epochs
        self.aug_until_epoch = settings.augmented_until
        self.mixup_prob = settings.mixup_prob if self.train else 0.0
        self.mixup_epochs = mixup_window(settings.mixup_epochs)
        self.ignore_background_epochs = settings.ignore_background_epochs
        self.epoch = 0
        self.augment = self.train  # False: plain samples (evaluation, or the no-aug epochs)
        self.mosaic_enabled = self.mosaic_prob > 0
        self.mixup_enabled = False
        self.ignore_background = False
        self.active = list(range(len(self.image_paths)))  # positions -> item indices (see set_epoch)
        self.cache: ImageCache | None = None  # train.cache: decoded fit-size images (see attach_caches)

    # -------- epoch-dependent state (call set_epoch before each epoch; workers are re-created per epoch)

    def set_epoch(self, epoch: int) -> None:
        """Mosaic closes for the last no_mosaic_epochs; mixup runs only inside train.mixup.epochs; the last
        no_aug_epochs get no augmentation at all (mosaic, mixup, albumentations); background images are left
        out for the first ignore_background_epochs (only those samples: batches are formed from the rest)."""
        self.epoch = int(epoch)
        augment = self.train and self.epoch < self.aug_until_epoch
        if self.augment and not augment:
            logger.info(f"epoch {self.epoch + 1}: no augmentation for the last {self.no_aug_epochs} epoch(s)")
        self.augment = augment
        mosaic = augment and self.mosaic_prob > 0 and self.epoch < self.mosaic_until_epoch
        if self.mosaic_enabled and not mosaic and self.mosaic_prob > 0:
            logger.info(f"epoch {self.epoch + 1}: mosaic closed for the remaining epochs")
        self.mosaic_enabled = mosaic
        start, end = self.mixup_epochs
        self.mixup_enabled = augment and self.mixup_prob > 0 and start <= self.epoch < end
        self.set_ignore_background(self.train and self.epoch < self.ignore_background_epochs)

    def set_ignore_background(self, ignore: bool) -> None:
        """Rebuild the index: with ignore=True only images that have at least one box remain."""
        self.ignore_background = bool(ignore)
        self.active = [i for i in range(len(self.image_paths)) if not (ignore and self.is_background(i))]

    def is_background(self, index: int) -> bool:
        return len(self.class_ids[index]) == 0

    @property
    def num_backgrounds(self) -> int:
        return sum(self.is_background(i) for i in range(len(self.image_paths)))

    def object_counts(self) -> dict[str, int]:
        counts = Counter(int(c) for ids in self.class_ids for c in ids)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

    def __len__(self) -> int:
        return len(self.active)

    # -------- loading

    def read_image(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The image (original, or its fit-size copy from train.cache) and the original (w, h)."""
        if self.cache is not None:
            return self.cache.get(index)
        image = read_image_rgb(self.image_paths[index])
        return image, (image.shape[1], image.shape[0])

    def load_sample(self, index: int, masks: bool = True) -> Sample:
        """Image + its boxes as xyxy pixels of that image + class ids (class 0 for every box with
        use_one_class). Labels are normalised, so a cached (resized) image gets its boxes just as right.

        Segmentation (and `masks`): the image is first brought to its size inside the network input (what
        train.cache holds), and its polygons are rasterised at that size: one mask per object never costs
        more than the input size, whatever the photo's resolution."""
        image, _ = self.read_image(index)
        if self.segment and masks:
            image = fit_image(image, self.img_size, self.keep_ratio)  # no-op for a cached or small image
        height, width = image.shape[:2]
        boxes = cxcywh_to_xyxy(torch.from_numpy(self.boxes[index])).numpy()
        boxes = boxes * np.array([width, height, width, height], np.float32)
        labels = self.class_ids[index].copy()
        if self.use_one_class:
            labels[:] = 0
        sample = Sample(image, boxes.astype(np.float32), labels)
        if not (self.segment and masks):
            return sample
        polygons = self.polygons[index]
        masks = polygons_to_masks(polygons, height, width).view(np.uint8)  # (N, H, W) 0/1
        return sample._replace(masks=masks, has_mask=polygons_has_mask(polygons))

    def _training_sample(self, index: int, rng: np.random.Generator) -> tuple[Sample, bool]:
        if self.mosaic_enabled and rng.random() < self.mosaic_prob:
            partners = rng.choice(self.active, size=3, replace=True)
            samples = [self.load_sample(i) for i in (index, *partners)]
            sample = make_mosaic(samples, self.img_size, self.keep_ratio, self.mosaic_params, rng)
            return sample, True
        return self.load_sample(index), False

    def _augmented_sample(self, index: int, seed: int) -> tuple[Sample, bool]:
        """Item `index` through mosaic (maybe) and albumentations, every random draw taken from `seed`."""
        sample, mosaic = self._training_sample(index, np.random.default_rng(seed))
        if self.transform is not None:
            self.transform.set_random_seed(seed)
            sample = apply_augmentations(self.transform, *sample)
        return sample, mosaic

    def _maybe_mix_up(self, sample: Sample, index: int) -> tuple[Sample, bool]:
        """DEIM's mixup with probability mixup_prob: blend with another (augmented) training sample.

        Its own random stream (seed, epoch, index, "mixup") leaves the mosaic and albumentations draws of
        a run without mixup unchanged, and a resumed epoch draws the same partners and ratios.
        """
        if not self.mixup_enabled:
            return sample, False
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, index, "mixup"))
        if rng.random() >= self.mixup_prob:
            return sample, False
        partner = int(rng.choice(self.active))
        ratio = float(rng.uniform(*MIXUP_RATIO_RANGE))
        other, _ = self._augmented_sample(
            partner, sample_seed(self.seed, self.epoch, index, "mixup", partner)
        )
        return mix_up(sample, other, self.img_size, self.keep_ratio, ratio), True

    def __getitem__(self, position: int) -> tuple[torch.Tensor, dict]:
        index = self.active[position]
        mosaic = mixup = False
        if self.augment:
            sample, mosaic = self._augmented_sample(index, sample_seed(self.seed, self.epoch, index))
            sample, mixup = self._maybe_mix_up(sample, index)
        else:
            sample = self.load_sample(index, masks=False)  # masks drawn at the network input (_to_network)
        height, width = sample.image.shape[:2]
        resized, meta = letterbox_or_resize(sample.image, self.img_size, self.keep_ratio)
        net = self._to_network(sample, meta, index)
        if self.cache is not None and not self.augment:  # val/test: report the original image, not the copy
            (width, height), meta = self.cache.sizes[index], from_original(meta, *self.cache.sizes[index])
        target = {
            "labels": torch.from_numpy(np.asarray(net.labels, np.int64)),
            "boxes": self._normalised_boxes(net.boxes, meta),
            "image_id": index,
            "orig_size": torch.tensor([width, height], dtype=torch.int64),
            "letterbox": meta,
            "path": str(self.image_paths[index]),
            "mosaic": mosaic,
            "mixup": mixup,
        }
        if self.segment:
            target["masks"] = torch.from_numpy(net.masks.astype(bool))  # (n, net_h, net_w)
            target["has_mask"] = torch.from_numpy(np.asarray(net.has_mask, bool))
            if not self.augment:  # the label polygons: evaluation's ground truth at the original size
                target["polygons"] = self.polygons[index]
        return image_to_tensor(resized), target

    def _to_network(self, sample: Sample, meta: Letterbox, index: int) -> Sample:
        """Boxes (xyxy pixels) and masks of the (augmented) image -> the network input's pixels. Augmented
        samples: masks letterboxed, boxes from the masks, objects whose mask vanished dropped. Plain samples:
        the label polygons rasterised straight at the network input (exact; nothing at the original size)."""
        boxes = boxes_xyxy_to_network(np.asarray(sample.boxes, np.float32).reshape(-1, 4), meta)
        net = sample._replace(boxes=boxes)
        if not self.segment:
            return net
        if sample.masks is not None:
            return fit_boxes_to_masks(net._replace(masks=letterbox_masks(sample.masks, meta)))
        polygons = self.polygons[index]
        masks = polygons_to_masks(polygons_to_network(polygons, meta), meta.net_h, meta.net_w).view(np.uint8)
        return net._replace(masks=masks, has_mask=polygons_has_mask(polygons))

    @staticmethod
    def _normalised_boxes(boxes_xyxy: np.ndarray, meta: Letterbox) -> torch.Tensor:
        """xyxy network pixels -> normalised cxcywh in the network input (N, 4)."""
        net = torch.from_numpy(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4))
        net = net / torch.tensor([meta.net_w, meta.net_h, meta.net_w, meta.net_h], dtype=torch.float32)
        return xyxy_to_cxcywh(net.clamp(0.0, 1.0)).float()


# ---------------------------------------------------------------- batching


def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """-> images (B, 3, h, w), list of B target dicts."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


def multiscale_size(img_size: tuple[int, int], rng: random.Random) -> tuple[int, int]:
    """A random input size around img_size: both sides change by the same multiple of 32, never below 64."""
    steps = [k * 32 for k in MULTISCALE_STEPS if min(img_size) + k * 32 >= 64]
    step = rng.choice(steps)
    return img_size[0] + step, img_size[1] + step


class TrainCollate:
    """Training collate: with probability `multiscale_prob` the whole batch is resized to one random size
    around img_size (boxes are normalised, so they stay right). Python `random` is seeded per worker by
    the DataLoader, so workers draw different sizes. Multiscale stops at `until_epoch` (the no-aug epochs,
    as DEIM stops it): call set_epoch before building each epoch's DataLoader."""

    def __init__(
        self, img_size: tuple[int, int], multiscale_prob: float, until_epoch: float = math.inf
    ) -> None:
        self.img_size = img_size
        self.multiscale_prob = float(multiscale_prob)
        self.until_epoch = until_epoch
        self.enabled = True

    def set_epoch(self, epoch: int) -> None:
        self.enabled = epoch < self.until_epoch

    def __call__(self, batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
        images, targets = collate_fn(batch)
        if self.enabled and self.multiscale_prob > 0 and random.random() < self.multiscale_prob:
            size = multiscale_size(self.img_size, random)
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images, targets


def build_collate(settings: DataSettings, train: bool):
    """The training collate (multiscale when train.multiscale_prob > 0) or the plain one."""
    if not train or settings.multiscale_prob <= 0:
        return collate_fn
    return TrainCollate(settings.img_size, settings.multiscale_prob, settings.augmented_until)


def _log_split_stats(datasets: dict[str, DetectionDataset]) -> None:
    for split, ds in datasets.items():
        objects = ds.object_counts()
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(objects.items(), key=lambda kv: -kv[1]))
        logger.info(
            f"{split}: {len(ds.image_paths)} images ({ds.num_backgrounds} background), objects: {summary}"
        )


def build_datasets(
    settings: DataSettings, split_paths: Mapping[str, Sequence[Path]], log: bool = True
) -> dict[str, DetectionDataset]:
    """{"train", "val"[, "test"]} datasets of the splits' image paths (a test split without images: none)."""
    datasets = {split: DetectionDataset(settings, split, split_paths[split]) for split in ("train", "val")}
    if split_paths.get("test"):
        datasets["test"] = DetectionDataset(settings, "test", split_paths["test"])
    if log:
        _log_split_stats(datasets)
    attach_caches(settings, [datasets["train"], datasets["val"]])
    return datasets


def attach_caches(settings: DataSettings, datasets: list[DetectionDataset]) -> None:
    """train.cache for the splits read every epoch (train, val): refused before decoding anything when the
    images would not fit, then filled (the test split is read once at the end: not cached)."""
    mode = cache_mode(settings.cache)
    if mode == "off":
        return
    check_cache_fits(mode, sum(len(ds.image_paths) for ds in datasets), settings.img_size)
    for dataset in datasets:
        dataset.cache = build_image_cache(
            dataset.image_paths, settings.img_size, settings.keep_ratio, mode, settings.cache_dir, cpu_count()
        )


# ---------------------------------------------------------------- debug images


def tensor_to_image(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) float in [0, 1] -> uint8 (h, w, 3) RGB."""
    array = image.detach().cpu().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array)


def draw_sample(image: torch.Tensor, target: dict, class_names: list[str]) -> np.ndarray:
    """A processed sample as the network sees it, with its target masks (segmentation) and boxes."""
    picture = tensor_to_image(image)
    if "masks" in target:
        picture = draw_masks(picture, target["masks"], target["labels"])
    height, width = picture.shape[:2]
    boxes = cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])
    return draw_detections(picture, boxes, target["labels"], None, class_names)


def save_debug_images(dataset: DetectionDataset, out_dir: str | Path, n: int) -> list[Path]:
    """Save the first n processed samples (after augmentation, mosaic, letterbox) with boxes drawn."""
    out_dir = Path(out_dir)
    saved = []
    for position in range(min(n, len(dataset))):
        image, target = dataset[position]
        stem = Path(target["path"]).stem
        tag = "_mosaic" * bool(target["mosaic"]) + "_mixup" * bool(target.get("mixup"))
        path = out_dir / f"{position:03d}_{stem}{tag}.jpg"
        saved.append(save_image_rgb(path, draw_sample(image, target, dataset.class_names)))
    return saved


def save_all_debug_images(datasets: dict[str, DetectionDataset], exp_dir: str | Path, n: int) -> list[Path]:
    """<exp_dir>/debug_images/<split>/ for every split (called once per run, on the main process)."""
    saved = []
    for split, dataset in datasets.items():
        if dataset is not None and n > 0:
            saved += save_debug_images(dataset, Path(exp_dir) / "debug_images" / split, n)
    return saved
