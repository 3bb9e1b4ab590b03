"""etl.convert: COCO JSON / Pascal VOC XML -> YOLO txt, and YOLO -> COCO JSON; never overwrites silently."""

from __future__ import annotations

import json
from pathlib import Path

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


def coco_back_to_yolo(tmp_path, coco_json, images) -> Path:
    """Convert a COCO file we wrote back to a YOLO folder (tmp_path/back) with the config's classes."""
    back = tmp_path / "back"
    convert.run(
        etl_config(
            tmp_path,
            back,
            "convert.format=coco2yolo",
            f"convert.src={coco_json}",
            f"convert.images={images}",
            "convert.use_config_classes=true",
        )
    )
    return back


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

    back = coco_back_to_yolo(tmp_path, out, data / "images")
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


# ---------------------------------------------------------------- segmentation (YOLO-seg)

SEG_W, SEG_H = 120, 80


def rect_mask(x0, y0, x1, y1) -> np.ndarray:
    mask = np.zeros((SEG_H, SEG_W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [SEG_H, SEG_W], "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def coco_seg_source(root):
    """One image: a triangle polygon, a two-part polygon, a compressed RLE (two blobs), an uncompressed crowd RLE,
    a box without segmentation, a polygon sticking out of the image and one with an unusable segmentation."""
    from faster_coco_eval.core import mask as mask_utils

    save_image(root / "raw" / "seg.jpg", (SEG_W, SEG_H))
    blobs = rect_mask(60, 40, 80, 60) | rect_mask(90, 45, 100, 70)
    compressed = mask_utils.encode(np.asfortranarray(blobs.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()  # as json stores it
    anns = [
        {"segmentation": [[10, 10, 40, 10, 25, 30]], "bbox": [10, 10, 30, 20]},
        {
            "segmentation": [[50, 5, 60, 5, 60, 15, 50, 15], [70, 5, 80, 5, 80, 15, 70, 15]],
            "bbox": [50, 5, 30, 10],
        },
        {"segmentation": compressed, "bbox": [60, 40, 40, 30]},
        {"segmentation": uncompressed_rle(rect_mask(5, 50, 25, 75)), "bbox": [5, 50, 20, 25], "iscrowd": 1},
        {"bbox": [30, 40, 10, 10]},  # detection only
        {"segmentation": [[100, 10, 130, 10, 130, 30, 100, 30]], "bbox": [100, 10, 30, 20]},  # sticks out
        {"segmentation": [[1, 2, 3, 4]], "bbox": [40, 60, 10, 10]},  # 2 points: box kept
    ]
    for index, ann in enumerate(anns, start=1):
        ann.update(id=index, image_id=1, category_id=1, iscrowd=ann.get("iscrowd", 0))
    coco = {
        "images": [{"id": 1, "file_name": "seg.jpg", "width": SEG_W, "height": SEG_H}],
        "categories": [{"id": 1, "name": "circle"}],
        "annotations": anns,
    }
    (root / "seg.json").write_text(json.dumps(coco))
    return root / "seg.json", root / "raw"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("crowd", [False, True])
def test_coco_segmentation_to_yolo_seg(tmp_path, caplog_loguru, crowd):
    from src.common.masks import polygon_to_mask

    ann, raw = coco_seg_source(tmp_path)
    out = tmp_path / "out"
    overrides = ["convert.format=coco2yolo", f"convert.src={ann}", f"convert.images={raw}"]
    convert.run(etl_config(tmp_path, out, *overrides, f"convert.include_crowd={crowd}"))
    labels = read_yolo_labels(out / "labels" / "seg.txt", 1)
    assert not labels.problems
    masks = [polygon_to_mask(p, SEG_H, SEG_W) if p is not None else None for p in labels.polygons]
    triangle = polygon_to_mask(np.array([[10, 10], [40, 10], [25, 30]]) / [SEG_W, SEG_H], SEG_H, SEG_W)
    expected = [
        triangle,
        rect_mask(50, 5, 60, 15) | rect_mask(70, 5, 80, 15),  # two parts joined into one outline
        rect_mask(60, 40, 80, 60) | rect_mask(90, 45, 100, 70),  # RLE, two blobs
        *([rect_mask(5, 50, 25, 75)] if crowd else []),  # the crowd RLE only on request
        None,  # no segmentation: a box line
        rect_mask(100, 10, 120, 30),  # clipped to the image
        None,  # unusable segmentation: its box
    ]
    assert len(masks) == len(expected)
    for found, wanted in zip(masks, expected, strict=True):
        assert (found is None) == (wanted is None)
        if wanted is not None:
            assert iou(found, wanted) > 0.97
    # a polygon's box is its (clipped) outline's extent
    np.testing.assert_allclose(labels.boxes[-2], [110 / SEG_W, 20 / SEG_H, 20 / SEG_W, 20 / SEG_H], atol=1e-6)
    np.testing.assert_allclose(labels.boxes[-3], [35 / SEG_W, 45 / SEG_H, 10 / SEG_W, 10 / SEG_H], atol=1e-6)
    assert "1 annotation(s) with an unusable segmentation keep only their box: 7" in caplog_loguru.text


def test_detection_coco_writes_box_lines_only(tmp_path):
    out, cfg = coco_config(tmp_path)
    convert.run(cfg)
    for path in (out / "labels").glob("*.txt"):
        assert all(len(line.split()) == 5 for line in path.read_text().splitlines())


def test_yolo_seg_coco_round_trip(tmp_path):
    from pycocotools.coco import COCO

    from src.etl.labels import polygon_area

    star = "1 0.5 0.1 0.6 0.4 0.9 0.5 0.6 0.6 0.5 0.9 0.4 0.6 0.1 0.5 0.4 0.4\n"
    labels = {
        "a.jpg": "0 0.1 0.1 0.4 0.1 0.25 0.5\n" + star,
        "b.jpg": "2 0.5 0.5 0.2 0.2\n0 0.6 0.6 0.9 0.6 0.8 0.9\n",
    }
    data = make_dataset(tmp_path / "data", labels, size=(SEG_W, SEG_H))
    out = convert.run(etl_config(tmp_path, data, "convert.format=yolo2coco"))
    coco = COCO(str(out))
    first = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    triangle_px = np.array([[0.1, 0.1], [0.4, 0.1], [0.25, 0.5]]) * [SEG_W, SEG_H]
    assert first[0]["segmentation"] == [np.round(triangle_px, 3).reshape(-1).tolist()]
    assert first[0]["area"] == pytest.approx(polygon_area(triangle_px), abs=1e-3)
    assert first[0]["bbox"] == pytest.approx([0.1 * SEG_W, 0.1 * SEG_H, 0.3 * SEG_W, 0.4 * SEG_H])
    assert coco.annToMask(first[1]).sum() > 0  # pycocotools reads our polygons
    box_line = coco.loadAnns(coco.getAnnIds(imgIds=[2]))[0]
    assert "segmentation" not in box_line and box_line["area"] == pytest.approx(0.04 * SEG_W * SEG_H)

    back = coco_back_to_yolo(tmp_path, out, data / "images")
    for name in ["a", "b"]:
        original = read_yolo_labels(data / "labels" / f"{name}.txt", 4)
        again = read_yolo_labels(back / "labels" / f"{name}.txt", 4)
        assert again.class_ids.tolist() == original.class_ids.tolist()
        np.testing.assert_allclose(again.boxes, original.boxes, atol=1e-5)
        for p, q in zip(original.polygons, again.polygons, strict=True):
            assert (p is None) == (q is None)
            if p is not None:
                np.testing.assert_allclose(q, p, atol=1e-5)


def test_merged_parts_rasterise_to_their_union():
    from src.common.masks import polygon_to_mask
    from src.etl.labels import is_self_intersecting
    from src.etl.polygons import merge_polygon_parts

    def square(x, y, side):
        return np.array([[x, y], [x + side, y], [x + side, y + side], [x, y + side]], float)

    parts = [square(10, 10, 20), square(50, 12, 15)[::-1], square(15, 50, 25), square(70, 60, 8)]
    merged = merge_polygon_parts([*parts, np.array([[0.0, 0.0], [1.0, 1.0]])])  # a 2-point part is ignored
    assert not is_self_intersecting(merged) and len(merged) == 4 * 4 + 2 * 3  # each bridge point twice
    union = np.any([polygon_to_mask(p / 100, 100, 100) for p in parts], axis=0)
    assert np.array_equal(polygon_to_mask(merged / 100, 100, 100), union)
    assert np.array_equal(merge_polygon_parts(parts[:1]), parts[0]) and merge_polygon_parts([]) is None
