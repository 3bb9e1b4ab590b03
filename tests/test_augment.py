"""Augmentations keep boxes on their objects: albumentations pipeline, mosaic, random affine."""

import numpy as np
import pytest

from src.dl.train.augment import (
    MosaicParams,
    apply_augmentations,
    build_augmentations,
    keep_box_candidates,
    make_mosaic,
    random_affine,
)

ALL_ON = {
    "left_right_flip": 1.0,
    "up_down_flip": 1.0,
    "rotate_90": 1.0,
    "rotation_degree": 10,
    "rotation_p": 1.0,
    "brightness_contrast": 1.0,
    "gamma": 1.0,
    "blur": 1.0,
    "noise": 1.0,
    "to_gray": 0.0,  # keeps colours to find objects by; covered separately
    "coarse_dropout": 0.0,  # may hide an object; covered separately
}
NONE = dict.fromkeys(ALL_ON, 0.0)  # every key of train.augs (the validated config has them all)
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def picture_with_rectangles(height, width, boxes, colors) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    for (x1, y1, x2, y2), color in zip(boxes, colors, strict=True):
        image[int(y1) : int(y2), int(x1) : int(x2)] = color
    return image


def color_mask(image: np.ndarray, color) -> np.ndarray:
    """Pixels clearly of `color` (interpolated edges excluded)."""
    return (np.abs(image.astype(int) - np.array(color)).max(axis=-1) < 60) & (image.max(axis=-1) > 100)


def assert_covers(image, box, color, tolerance=1.5):
    ys, xs = np.where(color_mask(image, color))
    assert len(xs) > 0, "object not visible"
    x1, y1, x2, y2 = box
    assert xs.min() >= x1 - tolerance and xs.max() + 1 <= x2 + tolerance
    assert ys.min() >= y1 - tolerance and ys.max() + 1 <= y2 + tolerance


def test_all_zero_probabilities_build_nothing():
    assert build_augmentations(NONE) is None


GEOMETRIC = NONE | {
    "left_right_flip": 0.5,
    "up_down_flip": 0.5,
    "rotate_90": 0.7,
    "rotation_degree": 10,
    "rotation_p": 1.0,
}
PIXEL = NONE | {"brightness_contrast": 1.0, "gamma": 1.0, "blur": 1.0, "noise": 1.0}


@pytest.mark.parametrize("seed", range(8))
def test_geometric_transforms_keep_boxes_on_objects(seed):
    boxes = np.array([[20, 30, 60, 70], [100, 10, 150, 40]], np.float32)
    image = picture_with_rectangles(120, 180, boxes, COLORS[:2])
    transform = build_augmentations(GEOMETRIC, seed=seed)
    out_image, out_boxes, out_labels, *_ = apply_augmentations(transform, image, boxes, np.array([3, 1]))
    assert out_labels.dtype == np.int64 and out_boxes.dtype == np.float32
    assert sorted(out_labels.tolist()) == [1, 3]  # a small rotation keeps both objects
    for box, label in zip(out_boxes, out_labels, strict=True):
        assert_covers(out_image, box, COLORS[0] if label == 3 else COLORS[1])


def test_pixel_transforms_leave_boxes_alone():
    boxes = np.array([[20, 30, 60, 70]], np.float32)
    image = picture_with_rectangles(120, 180, boxes, COLORS[:1])
    out_image, out_boxes, out_labels, *_ = apply_augmentations(
        build_augmentations(PIXEL, seed=0), image, boxes, [5]
    )
    assert out_image.shape == image.shape and not np.array_equal(out_image, image)
    np.testing.assert_allclose(out_boxes, boxes)
    assert out_labels.tolist() == [5] and out_labels.dtype == np.int64


def test_labels_given_as_list_come_back_as_int64():
    transform = build_augmentations(NONE | {"left_right_flip": 1.0})
    _, boxes, labels, *_ = apply_augmentations(
        transform, np.zeros((50, 80, 3), np.uint8), np.array([[10, 10, 30, 20]], np.float32), [2]
    )
    assert labels.dtype == np.int64 and labels.tolist() == [2]
    np.testing.assert_allclose(boxes, [[50, 10, 70, 20]], atol=1e-4)  # mirrored exactly


def test_background_image_passes_every_transform():
    transform = build_augmentations(ALL_ON | {"to_gray": 1.0, "coarse_dropout": 1.0})
    image, boxes, labels, *_ = apply_augmentations(
        transform, np.full((60, 90, 3), 128, np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    )
    assert boxes.shape == (0, 4) and labels.shape == (0,) and labels.dtype == np.int64
    assert image.dtype == np.uint8 and image.ndim == 3


def _mosaic_samples():
    samples = []
    for i, (height, width) in enumerate([(100, 160), (120, 90), (64, 64), (200, 150)]):
        box = np.array([[width * 0.2, height * 0.3, width * 0.7, height * 0.8]], np.float32)
        samples.append((picture_with_rectangles(height, width, box, [COLORS[i]]), box, np.array([i])))
    # The last one is a background image.
    samples[3] = (np.full((200, 150, 3), 30, np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    return samples


@pytest.mark.parametrize("keep_ratio", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_mosaic_boxes_cover_their_objects(seed, keep_ratio):
    params = MosaicParams(scale=(0.5, 1.5), degrees=0.0, translate=0.2, shear=0.0)
    image, boxes, labels, *_ = make_mosaic(
        _mosaic_samples(), (96, 128), keep_ratio, params, np.random.default_rng(seed)
    )
    assert image.shape == (96, 128, 3) and labels.dtype == np.int64 and boxes.shape == (len(labels), 4)
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 128).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 96).all()
    assert 3 not in labels  # the background image brings no boxes
    for box, label in zip(boxes, labels, strict=True):
        assert_covers(image, box, COLORS[label])


@pytest.mark.parametrize("seed", range(5))
def test_mosaic_keeps_boxes_of_mostly_visible_objects(seed):
    # Scale 1 and plain resize: every object is 50% x 50% of a (96, 128) tile = 3072 pixels when whole.
    params = MosaicParams(scale=(1.0, 1.0), degrees=0.0, translate=0.2, shear=0.0, min_area_ratio=0.1)
    image, _, labels, *_ = make_mosaic(
        _mosaic_samples(), (96, 128), False, params, np.random.default_rng(seed)
    )
    for label in range(3):
        visible = color_mask(image, COLORS[label]).sum()
        if visible > 0.15 * 3072:
            assert label in labels
        if visible == 0:
            assert label not in labels


def test_random_affine_with_rotation_and_shear_still_covers():
    box = np.array([[40, 30, 90, 70]], np.float32)
    image = picture_with_rectangles(100, 130, box, [COLORS[2]])
    params = MosaicParams(scale=(0.8, 1.2), degrees=20.0, translate=0.05, shear=3.0)
    for seed in range(5):
        out, boxes, labels, *_ = random_affine(
            image, box, np.array([7]), (100, 130), params, np.random.default_rng(seed)
        )
        assert labels.tolist() == [7]
        assert_covers(out, boxes[0], COLORS[2])


def test_tiny_and_mostly_clipped_boxes_are_dropped():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 100]], np.float32)
    after = np.array([[0, 0, 10, 10], [0, 0, 1, 10], [0, 0, 100, 5]], np.float32)
    keep = keep_box_candidates(before, after, scale=1.0, min_box_px=2, min_area_ratio=0.1)
    assert keep.tolist() == [True, False, False]
