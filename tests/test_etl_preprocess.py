"""etl.preprocess: every kind of input image and PDF becomes an RGB JPG; originals moved aside, never deleted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.common.images import read_image_rgb
from src.etl import preprocess
from tests.etl_data import etl_config, save_image

EXIF_ORIENTATION = 0x0112


def write_inputs(images: Path) -> dict[str, Path]:
    images.mkdir(parents=True)
    made = {}
    made["fine"] = save_image(images / "fine.jpg", (40, 20))
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 20))  # left half fully transparent black
    rgba.save(images / "rgba.png")
    Image.new("L", (40, 20), 100).save(images / "gray.png")
    Image.fromarray(np.full((20, 40), 65535, np.uint16)).save(images / "deep16.png")  # 16-bit grayscale
    palette = Image.new("P", (40, 20), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(images / "palette.png")
    Image.new("CMYK", (40, 20), (0, 255, 0, 0)).save(images / "cmyk.jpg")  # magenta
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # shown rotated by 90 degrees: 20 wide, 40 high
    rotated.save(images / "rotated.jpg", exif=exif)
    save_image(images / "shout.PNG", (40, 20))
    Image.new("RGB", (40, 20), (10, 20, 30)).save(images / "bitmap.bmp")
    Image.new("RGB", (40, 20), (10, 20, 30)).save(images / "scan.TIFF")
    Image.new("RGB", (40, 20), (10, 20, 30)).save(images / "web.webp")
    (images / "broken.png").write_bytes(b"definitely not a png")
    (images / "cut.jpg").write_bytes((images / "fine.jpg").read_bytes()[:300])
    save_image(images / "twin.png", (40, 20))
    save_image(images / "twin.jpg", (40, 20), color=(1, 2, 3))
    (images / "notes.txt").write_text("not an image")
    return made


def write_pdf(path: Path, pages: int) -> None:
    import pymupdf

    document = pymupdf.open()
    for i in range(pages):
        page = document.new_page(width=200, height=100)
        page.insert_text((20, 50), f"page {i + 1}")
    document.save(path)


@pytest.fixture()
def processed(tmp_path):
    data = tmp_path / "data"
    write_inputs(data / "images")
    write_pdf(data / "images" / "doc.pdf", pages=2)
    (data / "labels").mkdir()
    (data / "labels" / "rgba.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    fine_bytes = (data / "images" / "fine.jpg").read_bytes()
    cfg = etl_config(tmp_path, data)
    return data, cfg, preprocess.run(cfg), fine_bytes


def test_conversions_and_originals(processed):
    data, _, summary, fine_bytes = processed
    images, originals = data / "images", data / "originals" / "images"
    converted = {o.source.name for o in summary.by_status(preprocess.CONVERTED)}
    assert converted == {
        "rgba.png", "gray.png", "deep16.png", "palette.png", "cmyk.jpg", "rotated.jpg",
        "shout.PNG", "bitmap.bmp", "scan.TIFF", "web.webp", "doc.pdf",
    }  # fmt: skip
    for name in converted:  # every original moved aside, none deleted
        assert (originals / name).exists(), name
        assert name.endswith(".jpg") or not (images / name).exists()
    for name in ["rgba", "gray", "deep16", "palette", "cmyk", "rotated", "shout", "bitmap", "scan", "web"]:
        with Image.open(images / f"{name}.jpg") as out:
            assert out.format == "JPEG" and out.mode == "RGB", name
            assert out.getexif().get(EXIF_ORIENTATION, 1) == 1
    assert (images / "fine.jpg").read_bytes() == fine_bytes  # already fine: untouched
    assert [o.source.name for o in summary.by_status(preprocess.SKIPPED)] == ["fine.jpg", "twin.jpg"]
    assert (
        data / "labels" / "rgba.txt"
    ).read_text() == "0 0.5 0.5 0.2 0.2\n"  # stem kept, label still matches


def test_pixel_handling(processed):
    images = processed[0] / "images"
    rgba = read_image_rgb(images / "rgba.jpg")
    assert rgba[10, 5].min() > 240  # transparent -> white, not black
    assert rgba[10, 35, 0] > 240 and rgba[10, 35, 1] < 20  # opaque red stays red
    assert read_image_rgb(images / "rotated.jpg").shape == (40, 20, 3)  # EXIF rotation baked in
    assert read_image_rgb(images / "deep16.jpg").min() > 240  # 16-bit full scale -> 255, not clipped garbage
    assert abs(int(read_image_rgb(images / "gray.jpg")[5, 5, 0]) - 100) < 4
    palette = read_image_rgb(images / "palette.jpg")[5, 5]
    assert palette[1] > 240 and palette[0] < 20
    cmyk = read_image_rgb(images / "cmyk.jpg")[5, 5]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] > 200  # magenta


def test_pdf_pages(processed):
    data = processed[0]
    pages = sorted(p.name for p in (data / "images").glob("doc_p*.jpg"))
    assert pages == ["doc_p001.jpg", "doc_p002.jpg"]
    assert read_image_rgb(data / "images" / "doc_p001.jpg").shape[1] == pytest.approx(200 * 200 / 72, abs=2)
    assert (data / "originals" / "images" / "doc.pdf").exists()


def test_bad_inputs_reported_and_left_in_place(processed):
    data, _, summary, _ = processed
    images = data / "images"
    unreadable = {o.source.name: o.message for o in summary.by_status(preprocess.UNREADABLE)}
    assert set(unreadable) == {"broken.png", "cut.jpg"}
    assert "broken.png" in unreadable["broken.png"] and "truncated" in unreadable["cut.jpg"]
    clashes = {o.source.name: o.message for o in summary.by_status(preprocess.CLASH)}
    assert set(clashes) == {"twin.png"} and "twin.jpg" in clashes["twin.png"]
    for name in ["broken.png", "cut.jpg", "twin.png", "twin.jpg", "notes.txt"]:
        assert (images / name).exists(), name
    assert read_image_rgb(images / "twin.jpg")[0, 0].tolist() == pytest.approx(
        [1, 2, 3], abs=3
    )  # not overwritten
    assert [p.name for p in summary.ignored] == ["notes.txt"]
    assert "broken.png" in summary.text() and "notes.txt" in summary.text()


def test_second_run_changes_nothing(processed):
    data, cfg, _, _ = processed
    before = {p.name: p.read_bytes() for p in (data / "images").iterdir()}
    again = preprocess.run(cfg)
    assert not again.by_status(preprocess.CONVERTED)
    assert {p.name: p.read_bytes() for p in (data / "images").iterdir()} == before


def test_original_already_aside_is_not_overwritten(tmp_path):
    data = tmp_path / "data"
    Image.new("L", (8, 8), 0).save(save_image(data / "images" / "x.jpg").with_suffix(".png"))
    (data / "images" / "x.jpg").unlink()
    (data / "originals" / "images").mkdir(parents=True)
    (data / "originals" / "images" / "x.png").write_bytes(b"older original")
    summary = preprocess.run(etl_config(tmp_path, data))
    assert summary.by_status(preprocess.CLASH)[0].source.name == "x.png"
    assert (data / "originals" / "images" / "x.png").read_bytes() == b"older original"
    assert (data / "images" / "x.png").exists()


def test_heic(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    try:
        Image.new("RGB", (64, 32), (0, 200, 0)).save(data / "images" / "phone.HEIC")
    except Exception as err:  # wheels built without an encoder can only read
        pytest.skip(f"pillow-heif cannot write HEIC here: {err}")
    summary = preprocess.run(etl_config(tmp_path, data))
    assert [o.source.name for o in summary.by_status(preprocess.CONVERTED)] == ["phone.HEIC"]
    rgb = read_image_rgb(data / "images" / "phone.jpg")
    assert rgb.shape == (32, 64, 3) and rgb[10, 10, 1] > 150
    assert (data / "originals" / "images" / "phone.HEIC").exists()
