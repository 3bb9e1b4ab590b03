"""etl.convert: COCO JSON / Pascal VOC XML -> YOLO txt, and YOLO -> COCO JSON; never overwrites silently."""

from __future__ import annotations

import json

import numpy as np
import pytest

from src.common.errors import ConfigError
from src.etl import convert
from src.etl.convert import ConvertError
from src.etl.labels import read_yolo_labels
from tests.etl_data import etl_config, make_dataset, save_image


def coco_source(root):
    """3 images (one without objects), categories with sparse ids, a crowd box and a box sticking out."""
    save_image(root / "raw" / "sub" / "a.jpg", (100, 50))
    save_image(root / "raw" / "b.jpg", (200, 100), seed=1)
    save_image(root / "raw" / "empty.jpg", (10, 10), seed=2)
    coco = {
        "images": [
            {"id": 1, "file_name": "sub/a.jpg", "width": 100, "height": 50},
            {"id": 2, "file_name": "b.jpg", "width": 200, "height": 100},
            {"id": 3, "file_name": "empty.jpg", "width": 10, "height": 10},
            {"id": 4, "file_name": "not_downloaded.jpg", "width": 10, "height": 10},
        ],
        "categories": [
            {"id": 10, "name": "truck"},
            {"id": 3, "name": "person"},
            {"id": 7, "name": "dog: small"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 10, "bbox": [90, 40, 20, 20], "iscrowd": 0},  # sticks out
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 200, 100], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [50, 50, 10, 10], "iscrowd": 1},
            {"id": 5, "image_id": 4, "category_id": 3, "bbox": [1, 1, 2, 2], "iscrowd": 0},
        ],
    }
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "ann.json", root / "raw"


def coco_config(tmp_path, *overrides):
    ann, raw = coco_source(tmp_path)
    out = tmp_path / "out"
    return out, etl_config(
        tmp_path, out, "convert.format=coco2yolo", f"convert.src={ann}", f"convert.images={raw}", *overrides
    )


def test_coco_to_yolo(tmp_path, capsys):
    out, cfg = coco_config(tmp_path)
    convert.run(cfg)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.jpg", "b.jpg", "empty.jpg"]
    assert (tmp_path / "raw" / "sub" / "a.jpg").exists()  # copied, not moved
    a = read_yolo_labels(out / "labels" / "a.txt", 3)
    assert a.class_ids.tolist() == [0, 2] and not a.problems  # ids in category-id order: person, dog, truck
    np.testing.assert_allclose(a.boxes, [[0.2, 0.2, 0.2, 0.2], [0.95, 0.9, 0.1, 0.2]], atol=1e-6)  # clipped
    b = read_yolo_labels(out / "labels" / "b.txt", 3)
    assert b.class_ids.tolist() == [1]  # the crowd box is skipped
    assert (out / "labels" / "empty.txt").read_text() == ""
    expected = "label_to_name:\n  0: person\n  1: 'dog: small'\n  2: truck\n"
    assert (out / "label_to_name.yaml").read_text() == expected and expected in capsys.readouterr().out


def test_coco_crowd_kept_on_request(tmp_path):
    out, cfg = coco_config(tmp_path, "convert.include_crowd=true")
    convert.run(cfg)
    assert read_yolo_labels(out / "labels" / "b.txt", 3).class_ids.tolist() == [1, 0]


def test_never_overwrites_without_flag(tmp_path):
    out, cfg = coco_config(tmp_path)
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "a.txt").write_text("mine\n")
    with pytest.raises(ConvertError, match=r"refusing to overwrite existing file\(s\): .*a\.txt"):
        convert.run(cfg)
    assert (out / "labels" / "a.txt").read_text() == "mine\n" and not (out / "images").exists()
    convert.run(
        etl_config(
            tmp_path,
            out,
            *[f"convert.{k}={v}" for k, v in cfg.convert.items() if k in {"format", "src", "images"}],
            "convert.overwrite=true",
        )
    )
    assert (out / "labels" / "a.txt").read_text().startswith("0 ")


def test_coco_bad_inputs(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "raw").mkdir()
    base = ["convert.format=coco2yolo", f"convert.images={tmp_path / 'raw'}"]
    with pytest.raises(ConvertError, match=r"bad\.json: not valid JSON"):
        convert.run(etl_config(tmp_path, tmp_path / "o", *base, f"convert.src={tmp_path / 'bad.json'}"))
    (tmp_path / "seg.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ConvertError, match="missing annotations, categories"):
        convert.run(etl_config(tmp_path, tmp_path / "o", *base, f"convert.src={tmp_path / 'seg.json'}"))
    (tmp_path / "none.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x.jpg", "width": 1, "height": 1}],
                "annotations": [],
                "categories": [],
            }
        )
    )
    with pytest.raises(ConvertError, match="nothing to convert"):
        convert.run(etl_config(tmp_path, tmp_path / "o", *base, f"convert.src={tmp_path / 'none.json'}"))
    with pytest.raises(ConvertError, match="set convert.src"):
        convert.run(etl_config(tmp_path, tmp_path / "o", "convert.format=coco2yolo"))
    with pytest.raises(ConfigError, match="convert.format must be one of coco2yolo"):  # at load_config
        convert.run(etl_config(tmp_path, tmp_path / "o", "convert.format=csv"))


def voc_xml(file_name, size, objects):
    size_xml = (
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    )
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    return f"<annotation><filename>{file_name}</filename>{size_xml}{objs}</annotation>"


def test_voc_to_yolo(tmp_path):
    save_image(tmp_path / "JPEGImages" / "one.jpg", (100, 50))
    save_image(tmp_path / "JPEGImages" / "two.png", (40, 40), seed=3)
    xml = tmp_path / "Annotations"
    xml.mkdir()
    (xml / "one.xml").write_text(
        voc_xml("one.jpg", (100, 50), [("dog", (1, 1, 50, 25)), ("cat", (51, 26, 100, 50))])
    )
    (xml / "two.xml").write_text(
        voc_xml("renamed.png", None, [("dog", (11, 11, 30, 30))])
    )  # no size, stale name
    out = tmp_path / "out"
    convert.run(
        etl_config(
            tmp_path,
            out,
            "convert.format=voc2yolo",
            f"convert.src={xml}",
            f"convert.images={tmp_path / 'JPEGImages'}",
        )
    )
    one = read_yolo_labels(out / "labels" / "one.txt", 2)
    assert one.class_ids.tolist() == [1, 0]  # alphabetical: cat=0, dog=1
    np.testing.assert_allclose(
        one.boxes, [[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]], atol=1e-6
    )  # 1-based
    two = read_yolo_labels(out / "labels" / "two.txt", 2)
    np.testing.assert_allclose(two.boxes, [[0.5, 0.5, 0.5, 0.5]], atol=1e-6)  # size read from the image
    assert (out / "label_to_name.yaml").read_text() == "label_to_name:\n  0: cat\n  1: dog\n"


def test_voc_bad_inputs(tmp_path):
    (tmp_path / "img").mkdir()
    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "broken.xml").write_text("<annotation><object>")
    base = ["convert.format=voc2yolo", f"convert.src={xml}", f"convert.images={tmp_path / 'img'}"]
    with pytest.raises(ConvertError, match=r"broken\.xml: not valid XML"):
        convert.run(etl_config(tmp_path, tmp_path / "o", *base))
    (xml / "broken.xml").write_text(voc_xml("x.jpg", (10, 10), [("dog", ("a", 1, 2, 3))]))
    with pytest.raises(ConvertError, match=r"broken\.xml: object 1 \(dog\) has no valid bndbox"):
        convert.run(etl_config(tmp_path, tmp_path / "o", *base))
    (xml / "broken.xml").write_text(voc_xml("x.jpg", (10, 10), [("zebra", (1, 1, 2, 2))]))
    with pytest.raises(ConvertError, match="zebra not in label_to_name"):
        convert.run(etl_config(tmp_path, tmp_path / "o", *base, "convert.use_config_classes=true"))


def test_yolo_to_coco_round_trip(tmp_path):
    from pycocotools.coco import COCO

    labels = {
        "a.jpg": "0 0.5 0.5 0.5 0.5\n3 0.25 0.75 0.1 0.2\n",
        "b.jpg": None,
        "c.png": "2 0.1 0.1 0.2 0.2\n",
    }
    data = make_dataset(tmp_path / "data", labels, size=(40, 20))
    (data / "val.csv").write_text("image\na.jpg\nb.jpg\n")
    out = convert.run(etl_config(tmp_path, data, "convert.format=yolo2coco"))
    assert out == data / "coco.json"
    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle", "star"]
    assert [i["file_name"] for i in coco.loadImgs(coco.getImgIds())] == ["a.jpg", "b.jpg", "c.png"]
    first = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert first[0]["bbox"] == [10.0, 5.0, 20.0, 10.0] and first[1]["category_id"] == 3

    with pytest.raises(ConvertError, match="refusing to overwrite"):
        convert.run(etl_config(tmp_path, data, "convert.format=yolo2coco"))
    val = convert.run(
        etl_config(
            tmp_path,
            data,
            "convert.format=yolo2coco",
            f"convert.dst={tmp_path / 'val.json'}",
            f"convert.split_csv={data / 'val.csv'}",
        )
    )
    assert len(json.loads(val.read_text())["images"]) == 2

    back = tmp_path / "back"
    convert.run(
        etl_config(
            tmp_path,
            back,
            "convert.format=coco2yolo",
            f"convert.src={out}",
            f"convert.images={data / 'images'}",
            "convert.use_config_classes=true",
        )
    )
    for name in ["a", "c"]:
        original, again = (
            read_yolo_labels(data / "labels" / f"{name}.txt", 4),
            read_yolo_labels(back / "labels" / f"{name}.txt", 4),
        )
        np.testing.assert_allclose(again.boxes, original.boxes, atol=1e-5)
        assert again.class_ids.tolist() == original.class_ids.tolist()


def test_yolo_to_coco_refuses_bad_labels(tmp_path):
    data = make_dataset(tmp_path / "data", {"a.jpg": "0 0.5 0.5 0.5\n"})
    with pytest.raises(ConvertError, match=r"a\.txt:1: fatal: expected 5 fields"):
        convert.run(etl_config(tmp_path, data, "convert.format=yolo2coco"))
    assert not (data / "coco.json").exists()
