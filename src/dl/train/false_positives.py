"""False-positive ("query over-activation") metrics on a held-out folder of background-only images.

A detector fine-tuned on a small set keeps firing on objects it was pretrained on; mAP on val barely
shows it. A folder of images that contain none of the target classes measures it directly: every
detection there is a false positive. Metrics (keys prefixed "neg_", thresholds written with :g):
    neg_fppi@t        false positives per image with score >= t
    neg_clean_rate@t  share of images without any detection >= t
    neg_max_score     the most confident false positive over all images
    neg_mean_max_score  mean over images of each image's highest score
    neg_images        how many images were scored
The folder must not share images with the training data (else the numbers flatter the model):
check_negatives_disjoint compares file names and file contents.

The trainer uses these pieces: check_negatives_disjoint once at setup (against the train/val/test images),
evaluate_negatives on the EMA model every validation epoch (rank 0; on at most train.negatives_max_images of
them, evenly_spaced) and on best.pt after training (every negative; a "negatives" row of metrics.csv),
prefer_lower_fppi to pick best.pt when train.fppi_tolerance is set. The stage `python -m
src.dl.train.negatives` scores any experiment's artifact. The thresholds always come from the caller
(train.negatives_thresholds + train.conf_thresh, read by the stages).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from src.common.errors import UserError
from src.common.images import image_size, list_images, parallel_map, read_image_rgb
from src.common.network_input import image_to_tensor, letterbox_or_resize
from src.dl.train.dataset import collate_fn
from src.metrics.records import predict_batches
from src.runtime.detector import Detector
from src.runtime.evaluate import unthresholded_scores

MAX_LISTED = 10  # overlapping files named in the error


class NegativesOverlapError(UserError, ValueError):
    """A negative image is also a train/val/test image: its false-positive numbers would flatter the model."""


def fppi_key(threshold: float) -> str:
    return f"neg_fppi@{float(threshold):g}"


def clean_rate_key(threshold: float) -> str:
    return f"neg_clean_rate@{float(threshold):g}"


def evenly_spaced(image_paths: Sequence[Path], max_images: int | None) -> list[Path]:
    """At most `max_images` of `image_paths` (None: all), spread evenly over the list: the same images on every
    call, so the per-epoch numbers compare epochs, not samples; spread, not the first N, so a folder sorted by
    source (camera, scene) is covered across its sources."""
    paths = list(image_paths)
    if max_images is None or len(paths) <= max_images:
        return paths
    return [paths[i * len(paths) // int(max_images)] for i in range(int(max_images))]  # distinct: len > max


# ---------------------------------------------------------------- the folder and its overlap with training


def file_digest(path: str | Path) -> str:
    """blake2b of the file's bytes (a copied image keeps them; a re-encoded one would not)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_negatives_disjoint(
    negatives_path: str | Path | None,
    train_images: Iterable[str | Path],
    workers: int = 2,
    missing_ok: bool = True,
) -> list[Path]:
    """The negative images (sorted), after checking that none of them is also a training image.

    Overlap = the same file name stem (case-insensitive; a converted copy keeps its stem) or the same
    bytes. Raises NegativesOverlapError (a ValueError) naming the overlapping files; unreadable negatives
    raise ImageReadError.
    negatives_path None -> []; a missing folder -> [] (missing_ok) or FileNotFoundError.
    Only training files whose size equals a negative's are hashed, so a big training set costs stat calls.
    """
    if negatives_path is None or str(negatives_path) == "":
        return []
    folder = Path(negatives_path)
    if not folder.exists():
        if missing_ok:
            logger.info(f"no negatives folder at {folder}: false-positive metrics on negatives are off")
            return []
        raise FileNotFoundError(f"negatives folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"negatives path {folder} is not a folder of images")
    negatives = list_images(folder, recursive=True)
    if not negatives:
        logger.warning(
            f"negatives folder {folder} has no images: false-positive metrics on negatives are off"
        )
        return []
    parallel_map(image_size, negatives, workers, desc="negatives: headers")  # unreadable -> clear error

    train = list(dict.fromkeys(Path(p) for p in train_images))
    overlaps = _same_stem(negatives, train) + _same_content(negatives, train, workers)
    if overlaps:
        listed = "\n  ".join(overlaps[:MAX_LISTED])
        more = f"\n  ... and {len(overlaps) - MAX_LISTED} more" if len(overlaps) > MAX_LISTED else ""
        raise NegativesOverlapError(
            f"negatives folder {folder} overlaps the training images ({len(overlaps)} pair(s)):\n  {listed}{more}\n"
            "Negatives used in training make the false-positive metrics meaningless: remove these files "
            "from the negatives folder (or the images from the training split); rename a file if it is a "
            "different picture that merely shares a name."
        )
    return negatives


def _same_stem(negatives: Sequence[Path], train: Sequence[Path]) -> list[str]:
    by_stem: dict[str, Path] = {}
    for path in train:
        by_stem.setdefault(path.stem.lower(), path)
    return [
        f"{n} ~ {by_stem[n.stem.lower()]} (same file name)" for n in negatives if n.stem.lower() in by_stem
    ]


def _same_content(negatives: Sequence[Path], train: Sequence[Path], workers: int) -> list[str]:
    sizes = {path.stat().st_size for path in negatives}
    candidates = [path for path in train if path.exists() and path.stat().st_size in sizes]
    if not candidates:
        return []
    negative_digests = parallel_map(file_digest, negatives, workers, desc="negatives: hashing")
    train_digests = parallel_map(file_digest, candidates, workers, desc="training images: hashing")
    by_digest = dict(zip(train_digests, candidates, strict=True))
    return [
        f"{n} == {by_digest[d]} (same content)"
        for n, d in zip(negatives, negative_digests, strict=True)
        if d in by_digest
    ]


# ---------------------------------------------------------------- metrics


def negative_metrics(scores_per_image: Sequence[np.ndarray], thresholds: Sequence[float]) -> dict[str, float]:
    """Over-activation metrics from every image's detection scores (unthresholded top-K, any class)."""
    if len(scores_per_image) == 0:
        raise ValueError("negative_metrics: no images")
    scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores_per_image]
    image_max = np.array([s.max() if s.size else 0.0 for s in scores])
    metrics: dict[str, float] = {}
    for threshold in thresholds:
        counts = np.array([int((s >= threshold).sum()) for s in scores])
        metrics[fppi_key(threshold)] = float(counts.mean())
        metrics[clean_rate_key(threshold)] = float((counts == 0).mean())
    metrics["neg_max_score"] = float(image_max.max())
    metrics["neg_mean_max_score"] = float(image_max.mean())
    metrics["neg_images"] = float(len(scores))
    return metrics


def prefer_lower_fppi(
    candidate: dict,
    best: dict | None,
    map_tolerance: float | None,
    fppi_key: str,
    map_key: str = "mAP_50",
    peak_map: float | None = None,
) -> bool:
    """Should `candidate` (this epoch's metrics) replace `best` (the best model's metrics)?

    Within `map_tolerance` of the reference mAP the lower FPPI wins (equal FPPI: the higher mAP); a mAP
    more than the tolerance above best's wins regardless of FPPI; below the band the candidate loses.
    The reference is max(best's mAP, peak_map): pass the highest mAP seen so far as peak_map, else a
    chain of small drops, each within the tolerance, could drift far below the best mAP reached.
    map_key may be any higher-is-better score (e.g. the trainer's decision score). Without a tolerance
    (None) or without FPPI in either dict this is plain "higher mAP wins".
    """
    if best is None or map_key not in best:
        return True
    cand_map, best_map = float(candidate[map_key]), float(best[map_key])
    if map_tolerance is None or fppi_key not in candidate or fppi_key not in best:
        return cand_map > best_map
    reference = max(best_map, peak_map if peak_map is not None else -math.inf)
    if cand_map < reference - map_tolerance:
        return False
    if cand_map > best_map + map_tolerance:
        return True
    cand_fppi, best_fppi = float(candidate[fppi_key]), float(best[fppi_key])
    if cand_fppi != best_fppi:
        return cand_fppi < best_fppi
    return cand_map > best_map


# ---------------------------------------------------------------- running a model over the folder


class NegativeImages(torch.utils.data.Dataset):
    """Background-only images as the validation loader yields them: (tensor, target without boxes)."""

    def __init__(self, image_paths: Sequence[str | Path], img_size: Sequence[int], keep_ratio: bool):
        self.image_paths = [Path(p) for p in image_paths]
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.keep_ratio = bool(keep_ratio)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image = read_image_rgb(self.image_paths[index])
        resized, meta = letterbox_or_resize(image, self.img_size, self.keep_ratio)
        target = {
            "labels": torch.zeros(0, dtype=torch.int64),
            "boxes": torch.zeros(0, 4),
            "image_id": index,
            "letterbox": meta,
            "path": str(self.image_paths[index]),
        }
        return image_to_tensor(resized), target


@torch.no_grad()
def predict_negative_scores(
    model: torch.nn.Module,
    image_paths: Sequence[str | Path],
    postprocessor,
    img_size: Sequence[int],
    keep_ratio: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> list[np.ndarray]:
    """Scores (top-K, unthresholded) per image of a torch model, through the validator's own loop."""

    loader = torch.utils.data.DataLoader(
        NegativeImages(image_paths, img_size, keep_ratio),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        # Worker seeds from an own generator, not the global RNG: evaluating negatives during training
        # must not change the training's random stream (same run with or without a negatives folder).
        generator=torch.Generator().manual_seed(0),
    )
    was_training = model.training
    model.eval()
    try:
        preds, _ = predict_batches(
            model, loader, device, postprocessor, amp_dtype, desc="negatives", show_progress=show_progress
        )
    finally:
        model.train(was_training)
    return [pred["scores"] for pred in preds]


def detector_scores(detector: Detector, image_paths: Sequence[str | Path]) -> list[np.ndarray]:
    """Scores (top-K, unthresholded) per image of a src.runtime Detector (any backend)."""
    return unthresholded_scores(detector, image_paths)


def evaluate_negatives(
    model_or_detector,
    image_paths: Sequence[str | Path],
    thresholds: Sequence[float],
    *,
    postprocessor=None,
    img_size: Sequence[int] | None = None,
    keep_ratio: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """negative_metrics of a model over `image_paths`, with the shared preprocessing.

    model_or_detector: a src.runtime Detector (any backend; its own input size and batch), or a torch
    detector (e.g. the trainer's EMA model) with `postprocessor`, `img_size` (h, w) and `keep_ratio`.
    """
    if len(image_paths) == 0:
        raise ValueError("evaluate_negatives: no images (check_negatives_disjoint returned none?)")
    if isinstance(model_or_detector, Detector):
        scores = detector_scores(model_or_detector, image_paths)
    else:
        if postprocessor is None or img_size is None:
            raise ValueError("evaluate_negatives: a torch model needs postprocessor= and img_size=")
        scores = predict_negative_scores(
            model_or_detector, image_paths, postprocessor, img_size, keep_ratio, device, batch_size,
            num_workers, amp_dtype, show_progress,
        )  # fmt: skip
    return negative_metrics(scores, thresholds)


def describe(metrics: dict[str, float]) -> str:
    """One log line: FPPI and clean rate per threshold, the worst score."""
    parts = [
        f"FPPI@{key.split('@')[1]} {value:.3f}"
        for key, value in metrics.items()
        if key.startswith("neg_fppi@")
    ]
    parts += [
        f"clean@{key.split('@')[1]} {value:.1%}"
        for key, value in metrics.items()
        if key.startswith("neg_clean_rate@")
    ]
    return ", ".join([*parts, f"max score {metrics.get('neg_max_score', math.nan):.3f}"])
