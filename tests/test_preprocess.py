"""The shared network-input geometry: letterbox / resize and the box mappings both ways."""

import numpy as np
import pytest
import torch

from src.common.network_input import (
    PAD_VALUE,
    Letterbox,
    boxes_to_network,
    boxes_to_original,
    boxes_xyxy_to_network,
    image_to_tensor,
    letterbox_or_resize,
    network_boxes_to_original_xyxy,
    preprocess_images,
    to_model_input,
)

SIZES = [(100, 200), (200, 100), (37, 101), (17, 640), (320, 320), (641, 33)]  # (h, w) of the original


def filled_rectangle(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def bright_extent(image: np.ndarray) -> tuple[int, int, int, int]:
    """xyxy (pixel edges) of the clearly bright pixels."""
    ys, xs = np.where(image[..., 0] > 200)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_letterbox_pads_centred_with_grey():
    image = np.full((100, 200, 3), 7, np.uint8)
    resized, meta = letterbox_or_resize(image, (64, 64), keep_ratio=True)
    assert resized.shape == (64, 64, 3) and resized.dtype == np.uint8
    assert meta == Letterbox(0.32, 0.32, 0.0, 16.0, 200, 100, 64, 64)
    assert (resized[:16] == PAD_VALUE).all() and (resized[48:] == PAD_VALUE).all()
    assert (resized[16:48] == 7).all()


def test_plain_resize_stretches_without_padding():
    image = np.full((100, 200, 3), 7, np.uint8)
    resized, meta = letterbox_or_resize(image, (64, 96), keep_ratio=False)
    assert resized.shape == (64, 96, 3)
    assert (resized == 7).all()
    assert (meta.scale_x, meta.scale_y, meta.pad_x, meta.pad_y) == (0.48, 0.64, 0.0, 0.0)


@pytest.mark.parametrize("keep_ratio", [True, False])
@pytest.mark.parametrize("orig_hw", SIZES)
@pytest.mark.parametrize("net_hw", [(64, 64), (64, 96), (96, 32)])
def test_label_boxes_round_trip(orig_hw, net_hw, keep_ratio):
    rng = np.random.default_rng(0)
    height, width = orig_hw
    x1y1 = rng.uniform(0, 0.5, (5, 2))
    x2y2 = x1y1 + rng.uniform(0.05, 0.5, (5, 2))
    xyxy_norm = np.concatenate([x1y1, x2y2], 1)
    cxcywh = np.concatenate([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1).astype(np.float32)
    _, meta = letterbox_or_resize(np.zeros((height, width, 3), np.uint8), net_hw, keep_ratio)

    network = boxes_to_network(cxcywh, meta)
    assert network.shape == (5, 4) and network.dtype == np.float32
    assert (network[:, :2] >= 0).all() and (network[:, :2] <= 1).all()
    back = network_boxes_to_original_xyxy(network, meta)
    expected = np.clip(xyxy_norm * [width, height, width, height], 0, [width, height, width, height])
    np.testing.assert_allclose(back, expected, atol=1e-3 * max(width, height))


@pytest.mark.parametrize("keep_ratio", [True, False])
@pytest.mark.parametrize("orig_hw", SIZES)
def test_mapped_box_covers_the_resized_rectangle(orig_hw, keep_ratio):
    height, width = orig_hw
    box = (
        width // 4,
        height // 4,
        max(width // 4 + 2, 3 * width // 4),
        max(height // 4 + 2, 3 * height // 4),
    )
    resized, meta = letterbox_or_resize(filled_rectangle(height, width, box), (64, 96), keep_ratio)
    mapped = boxes_xyxy_to_network(np.array([box], np.float32), meta)[0]
    # Bright pixels of the resized picture lie where the mapped box says, within the blur of bilinear
    # interpolation: a pixel, or one source pixel's width when enlarging.
    found = np.array(bright_extent(resized), np.float32)
    np.testing.assert_allclose(found, mapped, atol=max(1.01, meta.scale_x, meta.scale_y))


def test_boxes_to_original_undoes_the_letterbox_and_clips():
    _, meta = letterbox_or_resize(np.zeros((100, 200, 3), np.uint8), (64, 64), keep_ratio=True)
    net = np.array([[0.0, 16.0, 64.0, 48.0], [-5.0, 0.0, 70.0, 64.0]], np.float32)
    original = boxes_to_original(net, meta)
    np.testing.assert_allclose(original[0], [0, 0, 200, 100], atol=1e-4)
    np.testing.assert_allclose(original[1], [0, 0, 200, 100], atol=1e-4)  # padding and beyond: clipped
    assert (net[0] == [0.0, 16.0, 64.0, 48.0]).all()  # input untouched


def test_boxes_to_original_keeps_torch_tensors():
    _, meta = letterbox_or_resize(np.zeros((50, 100, 3), np.uint8), (32, 32), keep_ratio=True)
    net = torch.tensor([[[8.0, 12.0, 16.0, 20.0]]])  # (B, N, 4) works too
    original = boxes_to_original(net, meta)
    assert isinstance(original, torch.Tensor) and original.shape == (1, 1, 4)
    np.testing.assert_allclose(original.numpy()[0, 0], [25.0, 12.5, 50.0, 37.5], atol=1e-4)


def test_model_input_layout():
    images = [np.full((32, 48, 3), v, np.uint8) for v in (0, 255)]
    batch = to_model_input(images)
    assert batch.shape == (2, 3, 32, 48) and batch.dtype == np.float32
    assert batch[0].max() == 0.0 and batch[1].min() == 1.0
    tensor = image_to_tensor(images[1])
    assert tensor.shape == (3, 32, 48) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), batch[1])


def test_preprocess_images_matches_the_dataset_path():
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 255, (40, 70, 3), dtype=np.uint8),
        rng.integers(0, 255, (90, 30, 3), dtype=np.uint8),
    ]
    batch, metas = preprocess_images(images, (64, 64), keep_ratio=True)
    assert batch.shape == (2, 3, 64, 64) and len(metas) == 2
    single = image_to_tensor(letterbox_or_resize(images[1], (64, 64), True)[0]).numpy()
    np.testing.assert_array_equal(batch[1], single)


def test_bad_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        letterbox_or_resize(np.zeros((10, 10), np.uint8), (32, 32), True)


def test_drawing_leaves_the_input_alone_and_tiles_letterboxed():
    from src.common.draw import GT_COLOR, draw_detections, draw_gt_vs_pred, tile_images

    image = np.zeros((50, 80, 3), np.uint8)
    drawn = draw_detections(image, torch.tensor([[10.0, 10, 40, 30]]), [1], [0.87], ["a", "b"])
    assert image.max() == 0 and drawn.shape == image.shape and drawn.max() > 0
    both = draw_gt_vs_pred(image, [[5, 5, 20, 20]], [0], np.zeros((0, 4)), [], [], ["a"])
    assert tuple(both[20, 12]) == GT_COLOR  # bottom edge of the GT box, in green
    grid = tile_images([image, np.zeros((30, 30, 3), np.uint8), image], cols=2)
    assert grid.shape == (100, 160, 3)
    assert (grid[50:, 80:] == PAD_VALUE).all()  # the empty cell
