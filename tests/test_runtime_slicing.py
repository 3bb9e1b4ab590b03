"""Sliced inference (src/runtime/slicing.py): a small object that whole-image inference misses is found, at
the right place; a large object cut by slice edges comes back as one box; merging and the stage switch.

The Detector is the real runtime Detector (letterbox/resize to the network input, thresholds, mapping back to
image pixels); its runner is a colour-blob finder instead of a trained D-FINE (training one that finds 6 px
objects takes far longer than a test): it reports every connected red region of its network input, so what
it sees is exactly what the network input keeps of the image (and, as a segmentation model, its mask).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from src.common.config import load_config
from src.dl.artifacts import sliced_if_configured
from src.metrics.masks import mask_iou
from src.runtime.detector import Detector
from src.runtime.meta import ModelMeta
from src.runtime.slicing import SlicedDetector, merge_detections

NET = (256, 256)  # network input (h, w)


class RedBlobRunner:
    """Runner protocol: (B, 3, h, w) float32 in [0, 1] -> top-K labels, boxes (network pixels), scores."""

    backend = "blob"
    batch_size = None
    max_batch_size = 8
    device = "cpu"
    precision = "fp32"

    def __init__(self, top_k: int = 20):
        self.meta = ModelMeta(class_names=["red"], img_size=NET, conf_thresh=0.5)
        self.top_k = top_k

    def __call__(self, images: np.ndarray, sizes: np.ndarray):
        batch = len(images)
        labels = np.full((batch, self.top_k), -1, np.int64)
        boxes = np.zeros((batch, self.top_k, 4), np.float32)
        scores = np.zeros((batch, self.top_k), np.float32)
        for b, image in enumerate(images):
            red = ((image[0] > 0.7) & (image[1] < 0.3) & (image[2] < 0.3)).astype(np.uint8)
            count, _, stats, _ = cv2.connectedComponentsWithStats(red)
            for k, (x, y, w, h, area) in enumerate(stats[1 : self.top_k + 1]):
                labels[b, k], scores[b, k] = 0, 0.6 + 0.4 * area / (w * h)
                boxes[b, k] = [x, y, x + w, y + h]
        return labels, boxes, scores


class RedBlobMaskRunner(RedBlobRunner):
    """The same blobs as a segmentation model reports them: a 4th output of mask logits at stride 4
    (+4 on the blob's pixels, -4 elsewhere), as a segment export gives them."""

    STRIDE = 4

    def __init__(self, top_k: int = 20):
        super().__init__(top_k)
        self.meta = ModelMeta(class_names=["red"], img_size=NET, conf_thresh=0.5, task="segment")

    def __call__(self, images: np.ndarray, sizes: np.ndarray):
        labels, boxes, scores = super().__call__(images, sizes)
        h, w = NET[0] // self.STRIDE, NET[1] // self.STRIDE
        masks = np.full((len(images), self.top_k, h, w), -4.0, np.float32)
        for b, image in enumerate(images):
            red = ((image[0] > 0.7) & (image[1] < 0.3) & (image[2] < 0.3)).astype(np.uint8)
            blob_ids = cv2.connectedComponents(red)[1][
                self.STRIDE // 2 :: self.STRIDE, self.STRIDE // 2 :: self.STRIDE
            ]
            for k in range(self.top_k):
                masks[b, k][blob_ids == k + 1] = 4.0
        return labels, boxes, scores, masks


def scene() -> tuple[np.ndarray, list[int], list[int]]:
    """A 1536x2048 grey image with a 6x6 px red dot and a 700x500 px red block crossing many slice edges."""
    image = np.full((1536, 2048, 3), 120, np.uint8)
    dot = [1405, 1207, 1411, 1213]  # between the pixels a 8x downscale samples (8i+3, 8i+4)
    block = [300, 200, 1000, 700]
    image[dot[1] : dot[3], dot[0] : dot[2]] = (255, 0, 0)
    image[block[1] : block[3], block[0] : block[2]] = (255, 0, 0)
    return image, dot, block


def test_slices_find_the_small_object_whole_image_inference_misses():
    image, dot, block = scene()
    plain = Detector(RedBlobRunner())
    whole = plain(image)
    assert len(whole) == 1  # only the block: the dot shrinks to under one pixel at 256 px and blurs away
    assert whole.boxes[0] == pytest.approx(block, abs=9)

    sliced = SlicedDetector(plain, overlap=0.2)(image)
    assert len(sliced) == 2
    by_size = sorted(sliced.boxes.tolist(), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    assert by_size[0] == pytest.approx(dot, abs=0.5)  # found at full resolution, mapped back exactly
    # the cut pieces and the whole-image box merged into one (the union: as loose as the whole-image box, whose
    # network pixel is 8 image pixels)
    assert by_size[1] == pytest.approx(block, abs=8)
    assert sliced.names == ["red", "red"] and sliced.image_size == (1536, 2048)


def test_sliced_segmentation_masks_are_pasted_and_merged():
    """Segmentation: slice masks land at their place in the full image; the block cut by slice edges comes
    back as one mask (the union of its pieces), the dot's mask at full resolution."""
    image, dot, block = scene()
    sliced = SlicedDetector(Detector(RedBlobMaskRunner()), overlap=0.2)(image)
    assert sliced.masks.shape == (2, 1536, 2048) and sliced.masks.dtype == bool
    truth = np.zeros((2, 1536, 2048), bool)
    for mask, (x0, y0, x1, y1) in zip(truth, (block, dot)):
        mask[y0:y1, x0:x1] = True
    by_size = np.argsort(-sliced.masks.sum((1, 2)))  # block first
    assert mask_iou(sliced.masks[by_size], truth).tolist() == pytest.approx([1.0, 1.0], abs=0.03)
    assert Detector(RedBlobRunner())(image).masks is None  # a detection model: no masks, as before


def test_same_call_api_and_small_images_are_one_pass():
    plain = Detector(RedBlobRunner())
    sliced = SlicedDetector(plain)
    small = np.full((200, 180, 3), 120, np.uint8)
    small[50:70, 40:60] = (255, 0, 0)
    assert len(sliced.windows(180, 200)) == 1  # not larger than a slice: the image itself, once
    single = sliced(small)
    batch = sliced([small, small[:, ::-1].copy()])
    assert single.boxes.tolist() == plain(small).boxes.tolist() and len(batch) == 2
    assert sliced.class_names == plain.class_names and sliced.thresholds().tolist() == [0.5]
    _, ms = sliced.timed([small])
    assert ms > 0


def test_merge_is_class_wise_greedy_by_score():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 9, 9], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 20, 10]], np.float32
    )
    scores = np.array([0.9, 0.95, 0.8, 0.7, 0.6], np.float32)
    labels = np.array([0, 0, 1, 0, 0])
    kept, kept_scores, kept_labels = merge_detections(boxes, scores, labels, "ios", 0.5, "nms")
    # box 1 (0.95) absorbs 0 and 4 (contained: IoS 1), class 1 kept apart, box 3 alone
    assert kept.tolist() == [[1, 1, 9, 9], [0, 0, 10, 10], [50, 50, 60, 60]]
    assert kept_scores.tolist() == pytest.approx([0.95, 0.8, 0.7]) and kept_labels.tolist() == [0, 1, 0]
    merged, _, _ = merge_detections(boxes, scores, labels, "ios", 0.5, "nmm")
    assert merged[0].tolist() == [0, 0, 20, 10]  # the union of what it absorbed
    iou_kept, _, _ = merge_detections(boxes, scores, labels, "iou", 0.5, "nms")
    assert len(iou_kept) == 4  # [0, 0, 20, 10] has IoU 0.32 with box 1: kept under IoU


def test_stage_switch(tmp_path):
    plain = Detector(RedBlobRunner())
    data = tmp_path / "tiled"
    data.mkdir()
    auto = load_config([f"data_path={data}"])
    assert sliced_if_configured(plain, auto) is plain  # not trained on tiles
    (data / "tiles.csv").write_text("tile,source,x0,y0,x1,y1,boxes\n")
    assert isinstance(sliced_if_configured(plain, auto), SlicedDetector)
    assert sliced_if_configured(plain, load_config([f"data_path={data}", "slicing.enabled=false"])) is plain
    forced = sliced_if_configured(plain, load_config(["slicing.enabled=true", "slicing.overlap=0.3"]))
    assert isinstance(forced, SlicedDetector) and forced.overlap == 0.3


def test_low_scores_never_grow_a_merged_box():
    """nmm with every top-K detection (as evaluation keeps them): a true small object must not absorb the
    low-score boxes around it and grow out of its IoU."""
    true_box = [100, 100, 116, 116]
    junk = [[90, 95, 112, 140], [104, 80, 160, 112], [60, 60, 115, 115]]  # each overlaps it by IoS >= 0.5
    boxes = np.array([true_box, *junk], np.float32)
    scores = np.array([0.9, 0.05, 0.04, 0.03], np.float32)
    labels = np.zeros(4, np.int64)
    grown, _, _ = merge_detections(boxes, scores, labels, "ios", 0.5, "nmm")
    assert grown[0].tolist() == [60, 60, 160, 140]  # without a floor: the union of everything
    kept, kept_scores, _ = merge_detections(boxes, scores, labels, "ios", 0.5, "nmm", grow_min_score=0.3)
    assert kept.tolist() == [true_box] and kept_scores.tolist() == pytest.approx([0.9])
    # two confident pieces of one object still merge to its union
    pieces = np.array([[0, 0, 50, 20], [20, 0, 100, 20], [50, 0, 150, 30]], np.float32)
    union, _, _ = merge_detections(pieces, np.array([0.8, 0.7, 0.1]), labels[:3], "ios", 0.5, "nmm", 0.3)
    assert union.tolist() == [[0, 0, 100, 20]]
