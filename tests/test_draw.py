"""Class names beyond ASCII are drawn with their own letters (OpenCV's fonts would draw "?" for each)."""

from __future__ import annotations

import numpy as np
import pytest

from src.common.draw import _characters, _font_files, draw_detections, font_for

BOX = [[20, 60, 150, 110]]


def label_pixels(name: str) -> np.ndarray:
    """The picture of one box labelled `name` on a grey 200x120 image (RGB)."""
    return draw_detections(np.full((120, 200, 3), 90, np.uint8), BOX, [0], class_names=[name], line_width=2)


def has_font_for(text: str) -> bool:
    return all(any(ord(c) in _characters(path) for path in _font_files()) for c in text)


@pytest.mark.parametrize(
    ("name", "other"),
    [("кошка", "ложка"), ("γάτα", "κότα"), ("café", "cafè"), ("猫 cat", "犬 dog")],
)
def test_names_with_the_same_length_but_other_letters_are_drawn_differently(name, other):
    if not has_font_for(name + other):
        pytest.skip(f"no installed font has {name + other!r} (Debian: fonts-droid-fallback)")
    a, b = label_pixels(name), label_pixels(other)
    assert (a != b).any()  # "?" per letter would draw both alike
    label = a[:60]  # the tag sits above the box
    white = (label > 200).all(axis=2)
    assert white.sum() > 20  # the letters are drawn in the text colour


def test_ascii_names_and_the_box_are_drawn_as_before():
    image = label_pixels("cat")
    assert (image[60, 20:150] != 90).all()  # the box's top edge
    assert not (label_pixels("cat") != image).any()


def test_a_character_no_font_has_is_said_once(caplog_loguru):
    private = "a\ue000"  # Unicode private use: no standard font draws it
    font_for.cache_clear()
    label_pixels(private)
    label_pixels(private + "b")
    assert caplog_loguru.text.count("no installed font has") == 1 and "U+E000" in caplog_loguru.text
    assert "fonts-droid-fallback" in caplog_loguru.text
