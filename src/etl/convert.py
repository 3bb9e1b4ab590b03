"""Convert annotations between COCO JSON, Pascal VOC XML and our YOLO-txt layout.

    python -m src.etl.convert convert.format=coco2yolo convert.src=ann.json convert.images=raw/ data_path=data/x
    python -m src.etl.convert convert.format=voc2yolo convert.src=Annotations/ convert.images=JPEGImages/ data_path=data/x
    python -m src.etl.convert convert.format=yolo2coco data_path=data/x convert.dst=data/x/coco.json

coco2yolo / voc2yolo write `<dst>/images/` (images COPIED from convert.images; the sources are never touched)
and `<dst>/labels/<stem>.txt`, an empty label file for an image without objects, and print + save the class
map as a ready-to-paste `label_to_name:` block in `<dst>/label_to_name.yaml`.
- Class ids become 0..N-1: COCO categories in the order of their ids, VOC names alphabetically;
  convert.use_config_classes=true maps names onto the config's label_to_name instead (unknown names: error).
- COCO `segmentation` (polygons, RLE) becomes YOLO-seg polygon lines, see src/etl/coco_segmentation.py;
  an annotation without one stays a box line (a detection-only COCO file gives the box labels it always did).
- COCO `iscrowd: 1` annotations mark a crowd region (many objects under one box) that COCO evaluation
  ignores; training on them as one object would teach the wrong box, so they are skipped
  (convert.include_crowd=true keeps them as ordinary objects, an RLE region traced into a polygon).
- VOC coordinates are 1-based pixel indices (the VOC devkit convention): a box covers
  [xmin - 1, xmax] x [ymin - 1, ymax] in 0-based continuous coordinates. `difficult` objects are kept.
- Existing label files (or a different image of the same name in `<dst>/images`) are an error listing them,
  before anything is written; convert.overwrite=true replaces them.
yolo2coco writes one COCO JSON (for pycocotools / FiftyOne): category ids = our class ids (0..N-1, so they
match model outputs), image ids 1..N in name order, bbox [x, y, w, h] in pixels of the image as displayed
(EXIF orientation applied), and for a polygon line `segmentation` in pixels with the polygon's area.
convert.split_csv=<train/val/test csv> limits it to that split.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.config import stage_main
from src.common.config_rules import label_names
from src.common.images import IMAGE_EXTS, image_size, list_images
from src.common.io import atomic_write_json, atomic_write_text
from src.etl.coco_segmentation import Outlines, coco_annotation
from src.etl.labels import FATAL, images_dir, label_path_for, labels_dir, read_yolo_labels, write_yolo_labels
from src.etl.polygons import clip_polygon_to_rect

MAX_LISTED = 10
CLASS_MAP_FILE = "label_to_name.yaml"


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file."""


@dataclass
class Item:
    """One image to write: where it comes from, its name in <dst>/images, and its objects."""

    source: Path
    name: str
    class_ids: list[int] = field(default_factory=list)
    xyxy: list[list[float]] = field(default_factory=list)  # pixels, 0-based continuous
    width: int = 0
    height: int = 0
    # per object: its outline (K, 2) in pixels (COCO segmentation), or None (a box only)
    polygons: list[np.ndarray | None] = field(default_factory=list)

    def add(self, class_id: int, xyxy: list[float], polygon: np.ndarray | None = None) -> None:
        self.class_ids.append(class_id)
        self.xyxy.append(xyxy)
        self.polygons.append(polygon)


# ---------------------------------------------------------------- shared


def listed(items: list[str]) -> str:
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(str(i) for i in items[:MAX_LISTED]) + more


def class_map_yaml(names: list[str]) -> str:
    return OmegaConf.to_yaml({"label_to_name": dict(enumerate(names))})


def class_ids_for(found: list[str], cfg: DictConfig, source: str) -> tuple[list[str], dict[str, int]]:
    """The class list and name -> id: `found` as given, or the config's label_to_name if use_config_classes."""
    if not cfg.convert.use_config_classes:
        return found, {name: i for i, name in enumerate(found)}
    names = label_names(cfg)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ConvertError(
            f"{source}: class(es) {listed(unknown)} not in label_to_name {names} (convert.use_config_classes=true)"
        )
    return names, {name: i for i, name in enumerate(names)}


def clipped_polygons(item: Item) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """(N, 4) xyxy boxes and polygons clipped to the image; a polygon's box is its clipped outline's extent
    (a polygon with nothing left inside gets an empty box)."""
    size = np.array([item.width, item.height, item.width, item.height], dtype=np.float64)
    xyxy = np.clip(np.array(item.xyxy, dtype=np.float64).reshape(-1, 4), 0, size)
    polygons: list[np.ndarray | None] = []
    for index, polygon in enumerate(item.polygons):
        if polygon is not None:
            polygon = clip_polygon_to_rect(polygon, (0, 0, item.width, item.height))
            xyxy[index] = np.concatenate([polygon.min(0), polygon.max(0)]) if polygon is not None else 0
        polygons.append(polygon)
    return xyxy, polygons


def normalised_cxcywh(item: Item) -> tuple[list[int], np.ndarray, list[np.ndarray | None], int]:
    """Boxes (and polygons) clipped to the image and normalised; returns (class ids, boxes, polygons,
    number dropped as empty)."""
    if not item.xyxy:
        return [], np.zeros((0, 4)), [], 0
    xyxy, polygons = clipped_polygons(item)
    size = np.array([item.width, item.height, item.width, item.height], dtype=np.float64)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    xyxy = xyxy[keep] / size
    boxes = np.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 2,
            (xyxy[:, 1] + xyxy[:, 3]) / 2,
            xyxy[:, 2] - xyxy[:, 0],
            xyxy[:, 3] - xyxy[:, 1],
        ],
        1,
    )
    polygons = [p / size[:2] if p is not None else None for p, k in zip(polygons, keep) if k]
    return [c for c, k in zip(item.class_ids, keep) if k], boxes, polygons, int((~keep).sum())


def find_image(folder: Path, file_name: str, fallback_stem: str | None = None) -> Path | None:
    """folder/file_name, else folder/<basename>, else (VOC) any image in folder with the fallback stem."""
    for candidate in (folder / file_name, folder / Path(file_name).name):
        if candidate.is_file():
            return candidate
    if fallback_stem:
        for ext in sorted(IMAGE_EXTS):
            for candidate in (folder / f"{fallback_stem}{ext}", folder / f"{fallback_stem}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def check_no_clobber(items: list[Item], dst: Path, names: list[str], overwrite: bool) -> None:
    """Refuse (before writing anything) to replace label files, different images or a different class map."""
    stems = [Path(item.name).stem for item in items]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ConvertError(f"several source images would share a label file (same stem): {listed(twice)}")
    if overwrite:
        return
    labels = [
        str(label_path_for(item.name, labels_dir(dst)))
        for item in items
        if label_path_for(item.name, labels_dir(dst)).exists()
    ]
    images = [
        str(images_dir(dst) / item.name)
        for item in items
        if (images_dir(dst) / item.name).exists()
        and not filecmp.cmp(item.source, images_dir(dst) / item.name, shallow=False)
    ]
    class_map = dst / CLASS_MAP_FILE
    maps = [str(class_map)] if class_map.exists() and class_map.read_text() != class_map_yaml(names) else []
    if labels or images or maps:
        raise ConvertError(
            f"refusing to overwrite existing file(s): {listed(labels + images + maps)}. "
            "Convert into an empty folder, or set convert.overwrite=true to replace them."
        )


def write_yolo_dataset(items: list[Item], names: list[str], dst: Path, overwrite: bool) -> Path:
    if not items:
        raise ConvertError("nothing to convert: no image found for any annotation")
    check_no_clobber(items, dst, names, overwrite)
    images_dir(dst).mkdir(parents=True, exist_ok=True)
    dropped = 0
    for item in items:
        target = images_dir(dst) / item.name
        if item.source.resolve() != target.resolve():
            shutil.copy2(item.source, target)  # copy: the source data set stays as it was
        class_ids, boxes, polygons, empty = normalised_cxcywh(item)
        dropped += empty
        write_yolo_labels(label_path_for(item.name, labels_dir(dst)), class_ids, boxes, polygons)
    if dropped:
        logger.warning(f"{dropped} box(es) with no area inside their image were dropped")
    yaml_block = class_map_yaml(names)
    atomic_write_text(dst / CLASS_MAP_FILE, yaml_block)
    total = sum(len(item.class_ids) for item in items) - dropped
    polygons = sum(p is not None for item in items for p in item.polygons)
    kinds = f"{total} objects, {polygons} of them polygons" if polygons else f"{total} boxes"
    logger.info(
        f"wrote {len(items)} images and label files ({kinds}) to {dst}; class map saved as {dst / CLASS_MAP_FILE}. "
        "Paste this into config.yaml:"
    )
    print(yaml_block, end="", flush=True)  # stdout, so it can be redirected on its own
    return dst


# ---------------------------------------------------------------- COCO -> YOLO


def load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from err
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise ConvertError(f"{path}: not a COCO detection file (missing {', '.join(missing)})")
    return data


def coco_items(cfg: DictConfig, json_path: Path, image_folder: Path) -> tuple[list[Item], list[str]]:
    data = load_json(json_path)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    found_names = [str(c["name"]) for c in categories]
    if len(set(found_names)) != len(found_names):
        raise ConvertError(f"{json_path}: category names repeat: {found_names}")
    names, id_of_name = class_ids_for(found_names, cfg, str(json_path))
    class_of_category = {c["id"]: id_of_name[str(c["name"])] for c in categories}

    items: dict[int, Item] = {}
    missing: list[str] = []
    for image in sorted(data["images"], key=lambda i: str(i["file_name"])):
        source = find_image(image_folder, str(image["file_name"]))
        if source is None:
            missing.append(str(image["file_name"]))
            continue
        items[image["id"]] = Item(source, source.name, width=int(image["width"]), height=int(image["height"]))
    if missing:
        logger.warning(
            f"{len(missing)} image(s) listed in {json_path} are not in {image_folder}, skipped: {listed(missing)}"
        )

    crowd = 0
    outlines = Outlines()
    for ann in data["annotations"]:
        item = items.get(ann["image_id"])
        if item is None:
            continue
        if ann.get("iscrowd", 0) and not cfg.convert.include_crowd:
            crowd += 1
            continue
        if ann["category_id"] not in class_of_category:
            raise ConvertError(
                f"{json_path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}"
            )
        x, y, w, h = (float(v) for v in ann["bbox"])
        polygon = outlines.read(ann, item.width, item.height)
        item.add(class_of_category[ann["category_id"]], [x, y, x + w, y + h], polygon)
    if crowd:
        logger.info(
            f"skipped {crowd} iscrowd annotation(s) (crowd regions; convert.include_crowd=true keeps them)"
        )
    outlines.log(json_path)
    warn_size_mismatches(list(items.values()), json_path)
    return list(items.values()), names


def warn_size_mismatches(items: list[Item], source: Path) -> None:
    """Annotation sizes that differ from the image (e.g. EXIF rotation the annotator did not see) are worth a word."""
    wrong = [
        f"{item.name} ({item.width}x{item.height} vs {'x'.join(map(str, image_size(item.source)))})"
        for item in items
        if image_size(item.source) != (item.width, item.height)
    ]
    if wrong:
        logger.warning(
            f"{source}: image size in the annotations differs from the image file for {listed(wrong)}"
        )


# ---------------------------------------------------------------- VOC -> YOLO


def parse_voc(path: Path) -> tuple[str, int, int, list[tuple[str, list[float]]]]:
    """(file name, width, height, [(class name, [x1, y1, x2, y2])]) of one VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ConvertError(f"{path}: not valid XML ({err})") from err
    objects = []
    for index, obj in enumerate(root.iter("object"), start=1):
        name, box = obj.findtext("name"), obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as err:
            raise ConvertError(
                f"{path}: object {index} ({name}) has no valid bndbox xmin/ymin/xmax/ymax"
            ) from err
        if not name:
            raise ConvertError(f"{path}: object {index} has no <name>")
        objects.append(
            (name.strip(), [xmin - 1, ymin - 1, xmax, ymax])
        )  # 1-based pixel indices -> 0-based edges
    width = int(float(root.findtext("size/width") or 0))
    height = int(float(root.findtext("size/height") or 0))
    return (root.findtext("filename") or "").strip(), width, height, objects


def voc_items(cfg: DictConfig, xml_folder: Path, image_folder: Path) -> tuple[list[Item], list[str]]:
    xml_files = sorted(p for p in xml_folder.iterdir() if p.suffix.lower() == ".xml")
    if not xml_files:
        raise ConvertError(f"no .xml files in {xml_folder}")
    parsed = [(path, *parse_voc(path)) for path in xml_files]
    names, id_of_name = class_ids_for(
        sorted({n for *_, objects in parsed for n, _ in objects}), cfg, str(xml_folder)
    )
    items, missing = [], []
    for path, file_name, width, height, objects in parsed:
        source = find_image(image_folder, file_name or path.stem, fallback_stem=path.stem)
        if source is None:
            missing.append(f"{path.name} -> {file_name}")
            continue
        if width <= 0 or height <= 0:  # some tools leave <size> out or zero
            width, height = image_size(source)
        item = Item(source, source.name, width=width, height=height)
        for name, box in objects:
            item.add(id_of_name[name], box)
        items.append(item)
    if missing:
        logger.warning(
            f"{len(missing)} annotation file(s) have no image in {image_folder}, skipped: {listed(missing)}"
        )
    return items, names


# ---------------------------------------------------------------- YOLO -> COCO


def yolo_to_coco(cfg: DictConfig, data_path: Path, split_csv: Path | None) -> dict:
    names = label_names(cfg)
    images = list_images(images_dir(data_path))
    if split_csv is not None:
        wanted = set(pd.read_csv(split_csv)["image"].astype(str))
        images = [p for p in images if p.name in wanted]
    if not images:
        raise ConvertError(
            f"no images to convert in {images_dir(data_path)}"
            + (f" listed in {split_csv}" if split_csv else "")
        )
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n, "supercategory": "none"} for i, n in enumerate(names)],
    }
    fatal = []
    for image_id, path in enumerate(images, start=1):
        width, height = image_size(path)
        labels = read_yolo_labels(
            label_path_for(path, labels_dir(data_path)), len(names), float(cfg.check.clip_tolerance)
        )
        fatal += [str(p) for p in labels.problems if p.severity == FATAL]
        coco["images"].append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        for class_id, box, polygon in zip(labels.class_ids.tolist(), labels.boxes, labels.polygons):
            ann_id = len(coco["annotations"]) + 1
            coco["annotations"].append(
                coco_annotation(ann_id, image_id, class_id, box, polygon, width, height)
            )
    if fatal:
        raise ConvertError(
            f"{len(fatal)} bad label line(s) (run `python -m src.etl.check` for the full report):\n  "
            + "\n  ".join(fatal[:20])
        )
    return coco


def coco_output_path(dst: Path) -> Path:
    return dst if dst.suffix.lower() == ".json" else dst / "coco.json"


# ---------------------------------------------------------------- stage


def required_path(value, key: str) -> Path:
    if value in (None, ""):
        raise ConvertError(f"set {key}=<path> for convert.format")
    path = Path(str(value))
    if not path.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    return path


def run(cfg: DictConfig) -> Path:
    c = cfg.convert
    fmt = str(c.format)
    if fmt == "yolo2coco":
        data_path = Path(str(c.src)) if c.src else Path(cfg.data_path)
        out = coco_output_path(Path(str(c.dst)) if c.dst else data_path)
        if out.exists() and not c.overwrite:
            raise ConvertError(
                f"refusing to overwrite {out}; set convert.overwrite=true or choose another convert.dst"
            )
        coco = yolo_to_coco(cfg, data_path, Path(str(c.split_csv)) if c.split_csv else None)
        atomic_write_json(out, coco)
        logger.info(
            f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} objects "
            f"({sum('segmentation' in a for a in coco['annotations'])} with a segmentation), "
            f"{len(coco['categories'])} categories"
        )
        return out
    if fmt not in ("coco2yolo", "voc2yolo"):
        raise ConvertError(f"convert.format must be coco2yolo, voc2yolo or yolo2coco, got {fmt!r}")
    source = required_path(c.src, "convert.src")
    image_folder = required_path(c.images, "convert.images")
    items, names = (
        coco_items(cfg, source, image_folder) if fmt == "coco2yolo" else voc_items(cfg, source, image_folder)
    )
    return write_yolo_dataset(items, names, Path(str(c.dst)), bool(c.overwrite))


main = stage_main(run)

if __name__ == "__main__":
    main()
