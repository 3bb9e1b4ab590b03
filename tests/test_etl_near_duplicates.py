"""Near-duplicates: planted copies found and kept in one split, unrelated look-alikes not paired, groups
that do not chain; the doctor's CSV and contact sheets; an existing leaking split refused, then fixed by
moving whole groups, and refused by training; small-object numbers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src.common.errors import UserError
from src.etl import split
from src.etl.data_quality import BOX_SIZES_CSV, BOX_SIZES_PNG, CONTACT_SHEETS_DIR, NEAR_DUPLICATES_CSV
from src.etl.doctor import check_dataset
from src.etl.near_duplicates import (
    Fingerprint,
    NearDuplicateSettings,
    candidate_pairs,
    fingerprint,
    near_duplicate_groups,
)
from tests.etl_data import etl_config
from tests.helpers.near_duplicate_data import planted_copy, scene

SCENES = 16
SETTINGS = NearDuplicateSettings(26, 0.6, 0.86)  # config.yaml's check.near_duplicate_*
COPIES = {0: "copy_of_00.jpg", 5: "copy_of_05.jpg", 9: "copy_of_09.jpg"}


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """16 unrelated demo scenes of different sizes + 3 altered copies (resized, JPEG, cropped, brightened,
    maybe mirrored)."""
    root = tmp_path_factory.mktemp("near") / "data"
    rng = np.random.default_rng(3)
    for i in range(SCENES):
        image = scene(i, seed=11, size=(120 + 8 * i, 160 + 4 * i))
        write_rgb(root / "images" / f"scene_{i:02d}.jpg", image)
        if i in COPIES:
            write_rgb(root / "images" / COPIES[i], planted_copy(image, rng))
        (root / "labels").mkdir(exist_ok=True)
        (root / "labels" / f"scene_{i:02d}.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    return root


def expected_groups() -> list[list[str]]:
    return sorted(sorted([f"scene_{i:02d}.jpg", name]) for i, name in COPIES.items())


def test_planted_copies_found_and_split_together(tmp_path, planted):
    cfg = etl_config(
        tmp_path,
        planted,
        f"splits_dir={tmp_path / 'splits'}",
        "split.train=0.3",
        "split.val=0.4",
        "split.test=0.3",
    )
    splits = split.run(cfg)
    report = check_dataset(cfg, write=False)
    assert sorted(report.near_duplicate_groups) == expected_groups()
    home = {name: s for s, names in splits.items() for name in names}
    for group in expected_groups():
        assert home[group[0]] == home[group[1]], group
    # the doctor's list, written before the split existed, names each member's split now that it does
    frame = pd.read_csv(tmp_path / "report" / NEAR_DUPLICATES_CSV, keep_default_na=False)
    assert sorted(frame["image"]) == sorted(n for g in expected_groups() for n in g)
    assert dict(zip(frame["image"], frame["split"])) == {n: home[n] for n in frame["image"]}
    assert not frame["leak"].any()


def test_doctor_reports_leaks_with_csv_and_contact_sheets(tmp_path, planted):
    splits_dir = tmp_path / "splits"
    names = sorted(p.name for p in (planted / "images").iterdir())
    leaking = {"scene_00.jpg": "train", "copy_of_00.jpg": "val"}  # one group across splits, the rest in train
    write_split(splits_dir, {n: leaking.get(n, "train") for n in names})
    check_dataset(etl_config(tmp_path, planted, f"splits_dir={splits_dir}"))
    frame = pd.read_csv(tmp_path / "report" / NEAR_DUPLICATES_CSV, keep_default_na=False)
    assert len(frame) == 6 and frame["group"].nunique() == 3
    leaks = frame[frame["leak"]]
    assert dict(zip(leaks["image"], leaks["split"])) == leaking
    sheets = sorted((tmp_path / "report" / CONTACT_SHEETS_DIR).glob("group_*.jpg"))
    assert len(sheets) == 3 and cv2.imread(str(sheets[0])) is not None


def write_split(folder: Path, split_of: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in split.SPLITS:
        rows = sorted(n for n, s in split_of.items() if s == name)
        pd.DataFrame({"image": rows}, dtype=str).to_csv(folder / f"{name}.csv", index=False)


def test_existing_leaking_split_refused_then_fixed(tmp_path, planted):
    splits_dir = tmp_path / "splits"
    names = sorted(p.name for p in (planted / "images").iterdir())
    split_of = {n: "train" for n in names} | {
        "copy_of_05.jpg": "val",
        "scene_09.jpg": "test",
        "scene_03.jpg": "val",
    }
    write_split(splits_dir, split_of)
    before = {s: (splits_dir / f"{s}.csv").read_bytes() for s in split.SPLITS}
    with pytest.raises(UserError, match=r"leaks: 2 group\(s\).*moves 2 image\(s\).*split.fix_leaks=true"):
        split.run(etl_config(tmp_path, planted, f"splits_dir={splits_dir}"))
    assert {s: (splits_dir / f"{s}.csv").read_bytes() for s in split.SPLITS} == before  # untouched

    fixed = split.run(etl_config(tmp_path, planted, f"splits_dir={splits_dir}", "split.fix_leaks=true"))
    home = {name: s for s, members in fixed.items() for name in members}
    assert home["copy_of_05.jpg"] == home["scene_05.jpg"] == "train"  # a tie goes to train
    assert home["copy_of_09.jpg"] == home["scene_09.jpg"] == "train"
    assert home["scene_03.jpg"] == "val"  # everything else stays where it was
    assert sorted(home) == names
    assert pd.read_csv(splits_dir / "test.csv")["image"].tolist() == []


def test_training_on_a_leaking_split_is_refused_unless_allowed(tmp_path, planted):
    from src.dl.train import run as train

    splits_dir = tmp_path / "splits"
    names = sorted(p.name for p in (planted / "images").iterdir())
    write_split(splits_dir, {n: "train" for n in names} | {"copy_of_05.jpg": "val", "scene_03.jpg": "val"})
    tiny = (
        f"splits_dir={splits_dir}", "exp_name=leaky", "model.img_size=[64,64]", "model.num_queries=10", "train.epochs=1",
        "train.max_steps_per_epoch=1", "train.batch_size=2", "train.num_workers=0", "train.debug_images=0",
        "train.eval_images=0", "train.use_ema=false",
    )  # fmt: skip
    with pytest.raises(UserError, match=r"leaks: 1 group.*copy_of_05.jpg \(val\).*split.fix_leaks=true"):
        train(etl_config(tmp_path, planted, *tiny))
    assert not (tmp_path / "output" / "leaky").exists()
    summary = train(etl_config(tmp_path, planted, *tiny, "train.allow_leaks=true"))
    assert Path(summary["exp_dir"], "best.pt").is_file()


def test_zero_one_and_very_different_sizes():
    assert near_duplicate_groups([], [], SETTINGS) == []
    one = fingerprint(np.zeros((5, 3000, 3), np.uint8))
    assert near_duplicate_groups(["a"], [one], SETTINGS) == []
    big = scene(1, size=(1080, 1920))
    small = cv2.resize(big, (96, 54), interpolation=cv2.INTER_AREA)
    prints = [fingerprint(big), None, fingerprint(small), fingerprint(scene(2, size=(40, 900)))]
    assert near_duplicate_groups(["big", "unreadable", "small", "other"], prints, SETTINGS) == [
        ["big", "small"]
    ]


def test_unrelated_smooth_backgrounds_are_not_paired_but_their_copies_are():
    """Smooth gradients under weak blotches share hash and coarse thumbnail by chance (two such pairs here pass
    the candidate test even at its stricter settings); their details tell them apart, a copy's do not."""
    rng = np.random.default_rng(3)
    images = [scene(i, seed=4, size=(120, 160), kind="smooth") for i in range(40)]
    images += [planted_copy(images[i], rng) for i in (4, 11, 20)]
    prints = [fingerprint(image) for image in images]
    look_alikes = {(i, j) for i, j, _, _ in candidate_pairs(prints, 22, 0.8)}
    assert {(4, 35), (11, 33)} <= look_alikes
    assert near_duplicate_groups(list(range(len(prints))), prints, SETTINGS) == [[4, 40], [11, 41], [20, 42]]


def crafted(thumb: np.ndarray) -> Fingerprint:
    """A fingerprint with the given coarse thumbnail (and its own mirror image), one hash and one detail."""
    thumb = (thumb / np.linalg.norm(thumb)).astype(np.float32)
    detail = np.random.default_rng(0).normal(0, 1, (32, 32, 3)).astype(np.float16)
    return Fingerprint((0, 0), np.stack([thumb, thumb]), detail)


def test_a_group_takes_an_image_only_when_it_is_close_to_every_member():
    """a ~ b and b ~ c (coarse correlation 0.71, details alike) but a and c are unrelated (0): the most
    similar pair groups, the third image stays out instead of chaining a to c through b."""
    a, c = np.eye(768)[0], np.eye(768)[1]
    prints = [crafted(a), crafted(a + c), crafted(c), crafted(a + 0.8 * c)]
    groups = near_duplicate_groups(["a", "b", "c", "b2"], prints, SETTINGS)
    assert groups == [["a", "b", "b2"]]  # b2 is close to a (0.78), b (0.99); c only to b and b2
    assert near_duplicate_groups(["a", "b", "c"], prints[:3], SETTINGS) in ([["a", "b"]], [["b", "c"]])


def test_box_size_report_numbers(tmp_path, caplog_loguru):
    root = tmp_path / "data"
    write_rgb(root / "images" / "wide.jpg", np.zeros((200, 400, 3), np.uint8))
    (root / "labels").mkdir()
    # 40x20 px and 8x4 px boxes; at 256x256 (plain resize) both sides scale to 25.6 and 5.12 px
    (root / "labels" / "wide.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.02 0.02\n")
    check_dataset(etl_config(tmp_path, root, "model.img_size=[256,256]", "model.keep_ratio=false"))
    sizes = pd.read_csv(tmp_path / "report" / BOX_SIZES_CSV)
    assert sizes[["width_px", "height_px"]].values.tolist() == [[40, 20], [8, 4]]
    assert sizes["net_size"].tolist() == pytest.approx([25.6, 5.12])
    assert (tmp_path / "report" / BOX_SIZES_PNG).stat().st_size > 1000
    # 50% small (< 16 px); under 20% small means no small box of 2: 5.12 px must reach 16: 256 * 3.125 = 800
    assert "50% of the boxes (1 of 2) are under 16 px" in caplog_loguru.text
    assert "model.img_size=[800, 800] (0% small)" in caplog_loguru.text
    assert "src.etl.tile`: 50% small" in caplog_loguru.text  # the 8x4 box is small even at full resolution
    # keep_ratio: one scale for both sides (256 / 400), so the 40x20 box becomes 25.6x12.8
    check_dataset(etl_config(tmp_path, root, "model.img_size=[256,256]", "model.keep_ratio=true"))
    sizes = pd.read_csv(tmp_path / "report" / BOX_SIZES_CSV)
    assert sizes[["net_width", "net_height"]].values.tolist()[0] == pytest.approx([25.6, 12.8])
