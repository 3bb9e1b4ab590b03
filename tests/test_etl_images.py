"""common.images: listing and reading any supported image as uint8 RGB."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from src.common.images import (
    ImageReadError,
    image_size,
    list_images,
    list_videos,
    parallel_map,
    read_image_rgb,
)


def test_list_images_any_case_sorted_no_hidden(tmp_path):
    for name in ["b.JPG", "a.png", "c.Heic", "d.txt", ".hidden.jpg", "e.mp4", "f.WebP"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.jpeg").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.Heic", "f.WebP"]
    assert [p.name for p in list_images(tmp_path, recursive=True)][-1] == "g.jpeg"
    assert [p.name for p in list_videos(tmp_path)] == ["e.mp4"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, [77, 77, 77]),
        ("1", 1, [255, 255, 255]),
        ("RGBA", (0, 0, 255, 0), [255, 255, 255]),  # transparent -> white
        ("LA", (0, 255), [0, 0, 0]),
        ("CMYK", (255, 0, 0, 0), [0, 255, 255]),  # cyan
        ("I;16", 65535, [255, 255, 255]),
        ("I", 32768, [128, 128, 128]),
        ("F", 0.5, [128, 128, 128]),
    ],
)
def test_modes_become_rgb(tmp_path, mode, value, expected):
    path = tmp_path / ("x.tif" if mode in {"I", "F", "CMYK"} else "x.png")
    Image.new(mode, (6, 4), value).save(path)
    rgb = read_image_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 6, 3)
    np.testing.assert_allclose(rgb[0, 0], expected, atol=2)


def test_sixteen_bit_rgb_tiff_via_opencv(tmp_path):
    deep = np.zeros((4, 6, 3), np.uint16)
    deep[..., 2] = 65535  # BGR: red at full 16-bit scale
    cv2.imwrite(str(tmp_path / "deep.tiff"), deep)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "deep.tiff")[0, 0], [255, 0, 0])


def test_exif_orientation_applied_and_size(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    rgb = read_image_rgb(tmp_path / "r.jpg")
    assert rgb.shape == (40, 20, 3)
    assert rgb[2, 10, 0] > 200 and rgb[-3, 10, 0] < 50  # left strip is now on top
    assert image_size(tmp_path / "r.jpg") == (20, 40)


def test_unreadable_and_truncated_name_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="junk.png"):
        read_image_rgb(tmp_path / "junk.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "ok.jpg"
    )
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:500])
    with pytest.raises(ImageReadError, match=r"cut\.jpg.*truncated"):
        read_image_rgb(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError):
        read_image_rgb(tmp_path / "missing.jpg")


def test_parallel_map_keeps_order():
    assert parallel_map(lambda x: x * 2, list(range(20)), workers=2, desc="t") == list(range(0, 40, 2))
    assert parallel_map(abs, [-3, 2, -1], workers=2, desc="t", processes=True) == [3, 2, 1]
