"""src/runtime/outputs.py's OutputNames: every output name a run derives from its inputs' relative paths is
its own, for generated input sets built to collide (shared stems, doubled extensions, separators spelled
out, folders named like outputs); and the detections' filter/select that the writers rely on."""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np
import pytest

from src.runtime.detector import Detections
from src.runtime.outputs import OutputNames

# Name pieces chosen to collide under a careless rule: extensions of inputs and outputs, the old "__"
# separator, the frame-folder suffix, escape characters, case variants.
PIECES = [
    "a",
    "b",
    "sub",
    "__",
    "_",
    ".",
    ".jpg",
    ".JPG",
    ".png",
    ".txt",
    ".mp4",
    "_frames",
    "_0",
    "%",
    "jpg",
]
IMAGE_EXTS = [".jpg", ".JPG", ".png", ".jpeg", ".heic", ".tif", ".webp"]
VIDEO_EXTS = [".mp4", ".avi", ".MOV"]
CLASSES = ["circle", "a/b", "a%2Fb", ".", "circle_"]


def random_name(rng: np.random.Generator) -> str:
    name = "".join(rng.choice(PIECES) for _ in range(rng.integers(1, 4)))
    return name if name not in (".", "..") else "x" + name


def random_inputs(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(image paths, video paths) relative to a root: distinct file paths, none of them also a folder.
    Half the names are made from earlier ones the way real folders collide: another extension (a.jpg,
    a.png), an extension added (a.jpg.jpg), folders spelled into the name (sub/a.jpg, sub__a.jpg)."""
    files: list[str] = []
    for _ in range(rng.integers(2, 14)):
        ext = str(rng.choice(IMAGE_EXTS + VIDEO_EXTS))
        if files and rng.random() < 0.5:
            earlier = PurePosixPath(str(rng.choice(files)))
            files.append(
                str(rng.choice([
                    str(earlier.with_suffix(ext)), str(earlier) + ext, str(earlier).replace("/", "__"),
                    f"{earlier.with_suffix('')}{rng.choice(PIECES)}/x{ext}",
                ]))
            )  # fmt: skip
            continue
        folders = [random_name(rng) for _ in range(rng.integers(0, 3))]
        files.append("/".join([*folders, random_name(rng) + ext]))
    folders = {str(parent) for f in files for parent in PurePosixPath(f).parents}
    unique = set(files) - folders  # a path cannot be a file and a folder at once
    images = sorted(f for f in unique if PurePosixPath(f).suffix in IMAGE_EXTS)
    videos = sorted(f for f in unique if PurePosixPath(f).suffix in VIDEO_EXTS)
    return images, videos


def every_output(names: OutputNames, images: list[str], videos: list[str]) -> list[tuple[str, PurePosixPath]]:
    """(input, output name) for every kind of output a run can write (a few detections and frames each)."""
    outputs = []
    for image in images:
        outputs += [(image, names.label(image)), (image, names.mask(image)), (image, names.drawing(image))]
        outputs += [(image, names.crop(image, c, i)) for c in CLASSES for i in (0, 1, 10)]
    for video in videos:
        tracks = names.tracks(video)  # TrackFiles adds .txt and .csv to it
        outputs += [(video, names.video(video))]
        outputs += [(video, tracks.with_name(tracks.name + suffix)) for suffix in (".txt", ".csv")]
        outputs += [(video, names.frame_label(video, f)) for f in (0, 1, 10)]
        outputs += [(video, names.crop(video, c, i, f)) for c in CLASSES for i in (0, 1) for f in (0, 10)]
    return outputs


def assert_all_distinct(outputs: list[tuple[str, PurePosixPath]]) -> None:
    """No two outputs share a name, and no output name is a folder that another output needs."""
    owner: dict[PurePosixPath, str] = {}
    for source, name in outputs:
        assert name not in owner, f"{name}: written for {owner.get(name)!r} and {source!r}"
        owner[name] = source
    folders = {parent for name in owner for parent in name.parents}
    clashes = folders & set(owner)
    assert not clashes, f"output names that another output needs as a folder: {sorted(map(str, clashes))}"


@pytest.mark.parametrize("seed", range(20))
def test_output_names_are_distinct_for_generated_input_sets(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        images, videos = random_inputs(rng)
        names = OutputNames(images + videos)
        assert_all_distinct(every_output(names, images, videos))


def test_known_collisions_keep_apart():
    images = ["a.jpg", "a.png", "a.jpg.jpg", "sub/a.jpg", "sub__a.jpg", "x.txt/c.jpg", "x.jpg"]
    videos = ["clip.mp4", "clip_frames/000000.jpg".replace(".jpg", ".mp4")]
    names = OutputNames(images + videos)
    assert str(names.label("a.jpg")) == "labels/a.jpg.txt"  # a.png shares the stem: extensions kept
    assert str(names.label("a.jpg.jpg")) == "labels/a.jpg.jpg.txt"  # its stem is another input's name
    assert str(names.label("sub/a.jpg")) == "labels/sub/a.txt"  # folders kept, not flattened with "__"
    assert str(names.crop("sub__a.jpg", "circle", 0)) == "crops/circle/sub__a_0.jpg"
    assert str(names.label("x.txt/c.jpg")) == "labels/x.txt_/c.txt"  # a folder named like an output file
    assert str(names.frame_label("clip.mp4", 3)) == "labels/clip_frames/000003.txt"
    assert str(names.crop("a.jpg", "a/b", 1)) == "crops/a%2Fb/a.jpg_1.jpg"  # a class name is one folder
    assert_all_distinct(every_output(names, images, videos))


def test_a_lone_name_keeps_the_usual_layout():
    names = OutputNames(["sub/b.JPG", "c.heic", "clip.mp4"])
    assert str(names.label("sub/b.JPG")) == "labels/sub/b.txt"  # YOLO's layout: images/x.jpg, labels/x.txt
    assert str(names.drawing("sub/b.JPG")) == "images/sub/b.JPG"  # its own name and format
    assert str(names.drawing("c.heic")) == "images/c.jpg"  # a format OpenCV does not write: JPG
    beside = OutputNames(["a.heic", "a.png", "a.heic.jpg", "x.heic/b.jpg"])
    assert [str(beside.drawing(n)) for n in ("a.heic", "a.png", "a.heic.jpg", "x.heic/b.jpg")] == [
        "images/a.heic_.jpg", "images/a.png", "images/a.heic.jpg", "images/x.heic/b.jpg",
    ]  # fmt: skip
    assert str(names.video("clip.mp4")) == "videos/clip.mp4"
    with pytest.raises(ValueError, match="same relative path"):
        OutputNames(["a.jpg", "a.jpg"])


def test_detections_filter_and_select():
    dets = Detections(
        np.arange(16, dtype=np.float32).reshape(4, 4), np.array([0.9, 0.6, 0.4, 0.2], np.float32),
        np.array([0, 1, 0, 1]), ["a", "b", "a", "b"], (10, 10), np.eye(4, 100, dtype=bool).reshape(4, 10, 10),
    )  # fmt: skip
    assert dets.filter(0.5).scores.tolist() == pytest.approx([0.9, 0.6])
    per_class = dets.filter(np.array([0.3, np.inf], np.float32))  # class b hidden
    assert per_class.names == ["a", "a"] and per_class.masks.shape == (2, 10, 10)
    picked = dets.select([3, 0])  # indices: in the order given
    assert picked.names == ["b", "a"] and (picked.masks[0] == dets.masks[3]).all()
    assert dets.held_to(np.array([0.1, 0.7])).tolist() == pytest.approx([0.1, 0.7, 0.1, 0.7])
