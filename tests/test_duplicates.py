"""Class-aware duplicate suppression (src.models.postprocess.duplicate_mask) on crafted boxes."""

from __future__ import annotations

import numpy as np

from src.models.postprocess import duplicate_mask


def boxes(*rows):
    return np.asarray(rows, np.float32).reshape(-1, 4)


def test_near_identical_boxes_of_one_class_keep_the_best_scoring():
    found = duplicate_mask(
        boxes([10, 10, 50, 50], [11, 10, 51, 50], [10, 11, 50, 49]),
        np.array([0.3, 0.6, 0.4]),
        np.array([2, 2, 2]),
        iou=0.7,
    )
    assert found.tolist() == [True, False, True]


def test_other_classes_and_separate_objects_are_kept():
    found = duplicate_mask(
        boxes([10, 10, 50, 50], [10, 10, 50, 50], [60, 60, 90, 90]),
        np.array([0.9, 0.8, 0.7]),
        np.array([0, 1, 0]),
        iou=0.7,
    )
    assert not found.any()


def test_threshold_is_strict_and_applies_to_kept_boxes_only():
    # b overlaps a at IoU 0.82 (a duplicate); c overlaps b at IoU 0.74 but a only at 0.6: it survives,
    # because the removed b does not suppress anything (greedy suppression, as NMS does).
    a, b, c = [0, 0, 100, 10], [10, 0, 110, 10], [25, 0, 125, 10]
    iou_ab = 90 / 110
    found = duplicate_mask(boxes(a, b, c), np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]), iou=0.7)
    assert iou_ab > 0.7 and found.tolist() == [False, True, False]
    # at exactly the IoU of the pair nothing is removed (strictly greater)
    same = duplicate_mask(boxes(a, b), np.array([0.9, 0.8]), np.array([0, 0]), iou=iou_ab)
    assert not same.any()


def test_empty_and_degenerate_inputs():
    assert duplicate_mask(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), iou=0.5).shape == (0,)
    # zero-area boxes have no overlap with anything
    found = duplicate_mask(boxes([5, 5, 5, 5], [5, 5, 5, 5]), np.array([0.5, 0.4]), np.array([1, 1]), 0.5)
    assert not found.any()
