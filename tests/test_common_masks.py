"""common.masks: polygon rasterisation without OpenCV's +1 px span bias, and masks back to polygons."""

from __future__ import annotations

import cv2
import numpy as np

from src.common.draw import draw_masks
from src.common.masks import mask_to_polygon, polygon_to_mask, polygons_has_mask, polygons_to_masks


def test_rectangle_covers_exactly_its_pixels():
    # x 0.1..0.6 of 40 px = pixels 4..23; y 0.1..0.5 of 20 px = pixels 2..9 (cv2.fillPoly alone: 21 x 9)
    square = np.array([[0.1, 0.1], [0.6, 0.1], [0.6, 0.5], [0.1, 0.5]])
    masks = polygons_to_masks([square, None], 20, 40)
    assert masks.shape == (2, 20, 40) and masks.dtype == bool
    assert masks[0].sum() == 20 * 8 and not masks[1].any()
    assert masks[0][2:10, 4:24].all()
    assert polygons_has_mask([square, None]).tolist() == [True, False]


def test_triangle_area_matches_geometry():
    triangle = np.array([[0.1, 0.1], [0.9, 0.2], [0.3, 0.9]])
    mask = polygon_to_mask(triangle, 200, 200)
    x, y = triangle[:, 0] * 200, triangle[:, 1] * 200
    area = abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2
    assert abs(mask.sum() - area) / area < 0.02  # digitisation of the slanted edges


def test_mask_to_polygon_round_trips_pixels():
    disk = np.zeros((64, 80), np.uint8)
    cv2.circle(disk, (30, 33), 17, 1, -1)
    disk = disk.astype(bool)
    polygon = mask_to_polygon(disk)
    assert polygon.dtype == np.float32 and polygon.min() >= 0 and polygon.max() <= 1
    again = polygon_to_mask(polygon, 64, 80)
    assert (again & disk).sum() / (again | disk).sum() > 0.99
    assert mask_to_polygon(np.zeros((8, 8), bool)) is None


def test_draw_masks_tints_only_the_mask():
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 5:15, 5:15] = True
    out = draw_masks(image, mask, [0])
    assert out[10, 10].any() and not out[0, 0].any() and not image.any()
