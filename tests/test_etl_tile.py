"""etl.tile: overlapping tiles at the network size, labels clipped, cut boxes dropped, background sampled,
tiles of one image kept in one split."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src.common.errors import UserError
from src.etl import split, tile
from src.etl.labels import read_yolo_labels
from src.etl.tiling import tile_starts, tile_windows
from tests.etl_data import etl_config

WIDTH, HEIGHT, OBJECT = (
    1000,
    600,
    40,
)  # a large image with 40 px objects; tiles of 256 overlapping by >= 51 px


def object_boxes() -> np.ndarray:
    """(N, 4) xyxy: a grid of objects everywhere, many of them across tile borders."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(20, WIDTH - OBJECT - 20, 90), np.arange(15, HEIGHT - OBJECT - 15, 85))
    x0 = xs.ravel() + rng.integers(0, 10, xs.size)
    y0 = ys.ravel() + rng.integers(0, 10, ys.size)
    return np.stack([x0, y0, x0 + OBJECT, y0 + OBJECT], axis=1).astype(np.float64)


@pytest.fixture()
def large(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    boxes = object_boxes()
    for x0, y0, x1, y1 in boxes.astype(int):
        cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), (250, 40, 40), -1)
    cv2.imwrite(str(root / "images" / "big.jpg"), image)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / WIDTH, (boxes[:, 1] + boxes[:, 3]) / 2 / HEIGHT
    lines = [f"0 {a:.6f} {b:.6f} {OBJECT / WIDTH:.6f} {OBJECT / HEIGHT:.6f}" for a, b in zip(cx, cy)]
    (root / "labels" / "big.txt").write_text("\n".join(lines) + "\n")
    cv2.imwrite(
        str(root / "images" / "small.jpg"), np.full((100, 120, 3), 30, np.uint8)
    )  # background, < a tile
    return root


def tile_config(tmp_path, data, *overrides):
    return etl_config(tmp_path, data, "tile.size=[256,256]", "tile.overlap=0.2", *overrides)


def boxes_in_source(tiles: pd.DataFrame, out: Path) -> list[tuple[np.ndarray, bool]]:
    """Every tile label mapped back to the source image: (xyxy, whole = not cut by the tile edge)."""
    found = []
    for row in tiles.itertuples():
        labels = read_yolo_labels(out / "labels" / f"{Path(row.tile).stem}.txt", 4)
        tw, th = row.x1 - row.x0, row.y1 - row.y0
        for cx, cy, w, h in labels.boxes.astype(np.float64):
            box = np.array([(cx - w / 2) * tw + row.x0, (cy - h / 2) * th + row.y0, (cx + w / 2) * tw + row.x0,
                            (cy + h / 2) * th + row.y0])  # fmt: skip
            found.append((box, abs(w * tw - OBJECT) < 0.5 and abs(h * th - OBJECT) < 0.5))
    return found


def test_tiles_cover_every_object_whole_exactly_once(tmp_path, large):
    out = tmp_path / "tiles"
    tiles = tile.run(tile_config(tmp_path, large, f"tile.out={out}", "tile.background_rate=1"))
    windows = tile_windows(WIDTH, HEIGHT, 256, 256, 0.2)
    assert len(tiles) == len(windows) + 1  # every window of big.jpg (rate 1) + small.jpg whole
    small = tiles[tiles["source"] == "small.jpg"].iloc[0]
    assert (small.x0, small.y0, small.x1, small.y1) == (0, 0, 120, 100)
    objects = object_boxes()
    found = boxes_in_source(tiles[tiles["source"] == "big.jpg"], out)
    whole = {tuple(np.round(box).astype(int)) for box, is_whole in found if is_whole}
    # every object is whole in at least one tile, and the whole copies are exactly the objects (each once)
    assert whole == {tuple(b.astype(int)) for b in objects}
    # a cut copy keeps >= min_visible of its object and lies inside it (clipped, never moved)
    for box, is_whole in found:
        if not is_whole:
            match = objects[np.argmin(np.abs(objects - box).sum(1))]
            inside = np.clip(box, match[[0, 1, 0, 1]], match[[2, 3, 2, 3]])
            assert np.allclose(inside, box, atol=0.5)
            assert (box[2] - box[0]) * (box[3] - box[1]) >= 0.5 * OBJECT * OBJECT - 1


def test_background_rate_and_split_follow_the_source(tmp_path, large):
    pd.DataFrame({"image": ["big.jpg"]}).to_csv(large / "train.csv", index=False)
    pd.DataFrame({"image": ["small.jpg"]}).to_csv(large / "val.csv", index=False)
    pd.DataFrame({"image": []}, dtype=str).to_csv(large / "test.csv", index=False)
    out = tmp_path / "tiles"
    tiles = tile.run(tile_config(tmp_path, large, f"tile.out={out}", "tile.background_rate=0"))
    assert (tiles["boxes"] > 0).all() and "small.jpg" not in set(tiles["source"])
    assert pd.read_csv(out / "train.csv")["image"].tolist() == tiles["tile"].tolist()
    assert pd.read_csv(out / "val.csv")["image"].tolist() == []
    with pytest.raises(Exception, match="not empty"):
        tile.run(tile_config(tmp_path, large, f"tile.out={out}"))


def test_split_of_a_tiled_set_keeps_tiles_of_one_image_together(tmp_path, large):
    out = tmp_path / "tiles"
    tile.run(tile_config(tmp_path, large, f"tile.out={out}", "tile.background_rate=1"))
    cfg = etl_config(
        tmp_path, out, "split.train=0.5", "split.val=0.5", "split.test=0", "check.near_duplicates=false"
    )
    splits = split.run(cfg)
    homes = {s for s, names in splits.items() for n in names if n.startswith("big__")}
    assert len(homes) == 1


@pytest.fixture()
def three_large(tmp_path) -> Path:
    """Three 1000x600 images with objects everywhere: enough sources for a split to spread them."""
    root = tmp_path / "many"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    boxes = object_boxes()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / WIDTH, (boxes[:, 1] + boxes[:, 3]) / 2 / HEIGHT
    lines = [f"0 {a:.6f} {b:.6f} {OBJECT / WIDTH:.6f} {OBJECT / HEIGHT:.6f}" for a, b in zip(cx, cy)]
    for i in range(3):
        image = np.random.default_rng(i).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"src{i}.jpg"), image)
        (root / "labels" / f"src{i}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_a_retile_replaces_exactly_its_own_tiles_and_split_refuses_orphans(tmp_path, three_large, caplog_loguru):
    out = tmp_path / "tiles"
    first = tile.run(tile_config(tmp_path, three_large, f"tile.out={out}", "tile.background_rate=1"))
    (out / "images" / "mine.jpg").write_bytes((out / "images" / first["tile"][0]).read_bytes())  # a user's
    (out / "notes.txt").write_text("mine")
    second = tile.run(
        tile_config(
            tmp_path, three_large, f"tile.out={out}", "tile.background_rate=1", "tile.overwrite=true",
            "tile.size=[160,160]",
        )
    )  # fmt: skip
    assert set(first["tile"]) - set(second["tile"])  # other windows: most earlier tiles are stale
    images = {p.name for p in (out / "images").iterdir()}
    assert images == set(second["tile"]) | {"mine.jpg"}  # the earlier tiles are gone, the user's file stays
    assert {p.stem for p in (out / "labels").iterdir()} == {Path(n).stem for n in second["tile"]}
    assert (out / "notes.txt").read_text() == "mine" and not (out / ".tiling-staging").exists()
    assert "mine.jpg" in caplog_loguru.text and "not tiles of this run" in caplog_loguru.text

    cfg = etl_config(tmp_path, out, "split.train=0.34", "split.val=0.33", "split.test=0.33", f"splits_dir={out}")
    with pytest.raises(UserError, match=r"1 image\(s\) in .* not listed in .*tiles.csv \(e.g. mine.jpg\)"):
        split.run(cfg)
    (out / "images" / "mine.jpg").unlink()
    splits = split.run(cfg)
    home = {n: s for s, names in splits.items() for n in names}
    assert set(home) == set(second["tile"])
    for source, group in second.groupby("source"):
        assert len({home[n] for n in group["tile"]}) == 1, source  # tiles of one image in one split


def test_a_stopped_retile_is_refused_by_split_and_cleaned_by_the_next_run(tmp_path, large):
    out = tmp_path / "tiles"
    config = tile_config(tmp_path, large, f"tile.out={out}", "tile.background_rate=1", "tile.overwrite=true")
    tiles = tile.run(config)
    # as a run stopped while swapping tiles in leaves it: a half-written new tile beside the old ones
    (out / "images" / "big__x9_y9.jpg").write_bytes(b"half")
    (out / "tiles.replacing.json").write_text(json.dumps({"previous": [], "new": ["big__x9_y9.jpg"]}))
    with pytest.raises(UserError, match="re-tiling was stopped"):
        split.run(etl_config(tmp_path, out, "check.skip_bad=true"))
    again = tile.run(config)
    assert {p.name for p in (out / "images").iterdir()} == set(again["tile"]) == set(tiles["tile"])
    assert not (out / "tiles.replacing.json").exists()


def test_tile_starts():
    assert tile_starts(100, 256, 0.2) == [0]
    assert tile_starts(256, 256, 0.2) == [0]
    starts = tile_starts(1000, 256, 0.2)
    assert starts[0] == 0 and starts[-1] == 1000 - 256
    assert all(256 - (b - a) >= 0.2 * 256 for a, b in zip(starts, starts[1:]))  # overlap at least 20%


# ---------------------------------------------------------------- YOLO-seg polygons


def star(center, outer: float, inner: float) -> np.ndarray:
    """A concave 10-corner star (K, 2) in pixels."""
    angles = 0.3 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    return np.asarray(center) + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


@pytest.fixture()
def one_supersampling(monkeypatch):
    """Rasterise every object at 4x: a clipped piece (smaller) would otherwise get a finer supersampling than
    the whole object, and the pixels whose coverage is near one half could flip."""
    from src.common import masks

    monkeypatch.setattr(masks, "SUPERSAMPLE_STEPS", ((10**6, 4),))


def test_clip_polygon_to_rect_matches_the_cropped_mask(one_supersampling):
    from src.common.masks import polygon_to_mask
    from src.etl.polygons import clip_polygon_to_rect

    shape = star((100, 90), 80, 30)
    full = polygon_to_mask(shape / [200, 200], 200, 200)
    for rect in [(0, 0, 100, 100), (60, 20, 180, 60), (120, 100, 200, 200), (0, 0, 200, 200)]:
        x0, y0, x1, y1 = rect
        clipped = clip_polygon_to_rect(shape, rect)
        assert clipped[:, 0].min() >= x0 and clipped[:, 0].max() <= x1
        part = polygon_to_mask((clipped - [x0, y0]) / [x1 - x0, y1 - y0], y1 - y0, x1 - x0)
        crop = full[y0:y1, x0:x1]
        assert (part ^ crop).sum() <= 0.005 * crop.sum() + 1, rect  # vertices rounded to 1/16 px
    assert clip_polygon_to_rect(shape, (190, 190, 200, 200)) is None  # nothing of it there
    assert clip_polygon_to_rect(np.array([[0, 0], [10, 0], [10, 10]]), (10, 0, 20, 20)) is None  # a touch


def test_polygons_are_clipped_to_each_tile(tmp_path, one_supersampling):
    from src.common.masks import polygon_to_mask

    width, height = 600, 400
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    cv2.imwrite(str(root / "images" / "big.jpg"), np.full((height, width, 3), 90, np.uint8))
    shapes = [star((c, r), 70, 28) for c in (120, 240, 380, 500) for r in (110, 280)]
    lines = [" ".join(["1", *(f"{v:.6f}" for v in (s / [width, height]).reshape(-1))]) for s in shapes]
    lines.append("2 0.5 0.5 0.1 0.1")  # a box line stays a box line
    (root / "labels" / "big.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "tiles"
    tiles = tile.run(tile_config(tmp_path, root, f"tile.out={out}", "tile.background_rate=1"))
    full = [polygon_to_mask(s / [width, height], height, width) for s in shapes]
    areas = np.array([m.sum() for m in full])
    seen_cut = 0
    for row in tiles.itertuples():
        labels = read_yolo_labels(out / "labels" / f"{Path(row.tile).stem}.txt", 4)
        assert not labels.problems
        tw, th = row.x1 - row.x0, row.y1 - row.y0
        crops = np.array([m[row.y0 : row.y1, row.x0 : row.x1] for m in full])  # (S, th, tw)
        visible = crops.reshape(len(full), -1).sum(1) / areas
        polygons = [p for p in labels.polygons if p is not None]
        assert len(polygons) == int((labels.class_ids == 1).sum())
        kept = set()
        for polygon in polygons:
            mask = polygon_to_mask(polygon, th, tw)
            ious = [(mask & c).sum() / max((mask | c).sum(), 1) for c in crops]
            assert max(ious) > 0.99  # exactly the object's own pixels in this tile
            kept.add(int(np.argmax(ious)))
            seen_cut += visible[int(np.argmax(ious))] < 0.98
        # kept where at least tile.min_visible (0.5) of its area is inside (pixel counts: +-2%)
        assert set(np.flatnonzero(visible >= 0.52)) <= kept <= set(np.flatnonzero(visible >= 0.48))
        boxes = labels.boxes[[p is None for p in labels.polygons]]
        assert (labels.class_ids[[p is None for p in labels.polygons]] == 2).all() and len(boxes) <= 1
    assert seen_cut > 0  # some stars were cut by a tile edge


def test_evaluation_of_a_tiled_experiment_reads_the_full_images(tmp_path, large):
    from src.dl.split_samples import full_image_config, load_split_samples

    pd.DataFrame({"image": ["small.jpg"]}).to_csv(large / "train.csv", index=False)
    pd.DataFrame({"image": ["big.jpg"]}).to_csv(large / "val.csv", index=False)
    pd.DataFrame({"image": []}, dtype=str).to_csv(large / "test.csv", index=False)
    out = tmp_path / "tiles"
    tiles = tile.run(tile_config(tmp_path, large, f"tile.out={out}"))
    experiment = tile_config(tmp_path, out)  # an experiment trained on the tiles
    full = full_image_config(experiment)
    samples = load_split_samples(full, "val")
    assert [s.path.name for s in samples] == ["big.jpg"] and len(samples[0].boxes) == len(object_boxes())
    assert len(load_split_samples(experiment, "val")) == int((tiles["source"] == "big.jpg").sum())
    # slicing off, or the full images gone: the tiles themselves
    off = tile_config(tmp_path, out, "slicing.enabled=false")
    assert full_image_config(off) is off
    large.rename(tmp_path / "moved")
    assert full_image_config(experiment) is experiment
