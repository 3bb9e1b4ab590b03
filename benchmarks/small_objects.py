"""Issue 16's small-object target: tiling + sliced inference against plain full-image training and inference,
at the same network size, on a set of 1920x1080 images with objects of 8-24 px.

    python -m benchmarks.small_objects [--out output/bench_small] [--images 30] [--img-size 320] [--steps 500]

1. Makes the data set under <out>/data (the demo's shapes, clutter and textures; 20-40 objects per image,
   sides 8-24 px of the 1080 px side) and splits it (config.yaml's fractions).
2. Cuts it into training tiles with `src.etl.tile` (tiles of the network size, config.yaml's tile keys).
3. Trains two D-FINE-n from scratch with the `make demo` recipe, in parallel, 1 torch thread each, for the
   same number of optimizer steps: `plain` on the full images (resized to the network input), `tiled` on the
   tiles (the full images' split).
4. Scores both on the full val + test images with the runtime (src.runtime.evaluate): plain = one
   whole-image pass; tiled = SlicedDetector (overlapping slices + the whole image, merged), and the tiled
   model without slicing for reference. Prints mAP50, mAP50-95 and latency; writes <out>/small_objects.json.
Target: tiled + sliced val mAP50 >= plain + 0.10. Tens of minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.seg_targets import DEMO_TRAIN, cpu_name

WIDTH, HEIGHT = 1920, 1080
OBJECT_PX = (8, 24)
OBJECTS = (20, 40)


def make_data(data: Path, images: int, seed: int = 0) -> None:
    """<data>/images + labels: `images` scenes of WIDTH x HEIGHT with small objects, then split."""
    from src.common.config import load_config
    from src.etl import make_demo_data as demo
    from src.etl import split
    from src.etl.labels import images_dir, labels_dir, write_yolo_labels

    cfg = load_config(
        [f"data_path={data}", f"demo_data.object_scale=[{OBJECT_PX[0] / HEIGHT},{OBJECT_PX[1] / HEIGHT}]"]
    )
    classes = demo.demo_classes(cfg)
    for folder in (images_dir(data), labels_dir(data)):
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        rng = np.random.default_rng([seed, index])
        count = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
        image, shapes = demo.make_scene(rng, HEIGHT, WIDTH, classes, count, cfg.demo_data)
        demo.write_jpg(images_dir(data) / f"small_{index:04d}.jpg", image)
        boxes = demo.yolo_boxes(shapes, HEIGHT, WIDTH)
        write_yolo_labels(labels_dir(data) / f"small_{index:04d}.txt", [s.class_id for s in shapes], boxes)
    split.run(load_config([f"data_path={data}", f"check.report_dir={data.parent / 'report'}"]))


def make_tiles(data: Path, img_size: int) -> Path:
    from src.common.config import load_config
    from src.etl import tile

    tiles = data.parent / "data_tiles"
    tile.run(
        load_config([f"data_path={data}", f"tile.out={tiles}", f"model.img_size=[{img_size},{img_size}]"])
    )
    return tiles


def train_images(data: Path) -> int:
    return sum(
        1 for line in (data / "train.csv").read_text().splitlines()[1:] if line.strip()
    )  # header: image


def train(name: str, data: Path, out: Path, img_size: int, epochs: int) -> int:
    command = [
        sys.executable, "-m", "src.dl.train", f"data_path={data}", f"output_dir={out / 'output'}",
        f"exp_name={name}", f"model.img_size=[{img_size},{img_size}]", f"train.epochs={epochs}",
        f"train.eval_every={epochs}", "train.threads=1", "train.overwrite=true", *DEMO_TRAIN,
    ]  # fmt: skip
    with (out / f"{name}.log").open("w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def score(out: Path, data: Path) -> dict:
    from src.common.config import load_config
    from src.dl.split_samples import load_split_samples
    from src.runtime import load_model
    from src.runtime.evaluate import evaluate_detector
    from src.runtime.slicing import SlicedDetector

    cfg = load_config([f"data_path={data}"])
    samples = load_split_samples(cfg, "val") + load_split_samples(cfg, "test")
    plain = load_model(out / "output" / "plain" / "best.pt", device="cpu")
    tiled = load_model(out / "output" / "tiled" / "best.pt", device="cpu")
    results = {}
    for name, detector in {
        "plain, whole image": plain,
        "tiled, whole image": tiled,
        "tiled, sliced": SlicedDetector(tiled, overlap=float(cfg.slicing.overlap), full_image=True),
    }.items():
        result = evaluate_detector(detector, samples, warmup=1, desc=name)
        results[name] = result.summary() | result.latency_stats()
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("output/bench_small"))
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps of each training (batch 8)")
    parser.add_argument("--score-only", action="store_true", help="score the two trained models again")
    args = parser.parse_args(argv)
    out, data = args.out, args.out / "data"
    out.mkdir(parents=True, exist_ok=True)
    if not args.score_only:
        if not (data / "train.csv").exists():
            make_data(data, args.images)
        tiles = (
            make_tiles(data, args.img_size)
            if not (out / "data_tiles" / "train.csv").exists()
            else out / "data_tiles"
        )
        plan = {"plain": data, "tiled": tiles}
        epochs = {name: max(1, round(args.steps * 8 / train_images(path))) for name, path in plan.items()}
        print(f"training images: plain {train_images(data)}, tiles {train_images(tiles)}; epochs {epochs}")
        with ThreadPoolExecutor(2) as pool:
            codes = dict(
                zip(plan, pool.map(lambda n: train(n, plan[n], out, args.img_size, epochs[n]), plan))
            )
        if any(codes.values()):
            raise SystemExit(f"training failed: {codes} (logs in {out})")
    results = score(out, data)
    print(f"CPU: {cpu_name()}; {args.img_size} px network input; val + test full images of {WIDTH}x{HEIGHT}")
    print("| model, inference | mAP50 | mAP50-95 | latency median (ms) |")
    for name, row in results.items():
        print(f"| {name} | {row['mAP_50']:.3f} | {row['mAP_50_95']:.3f} | {row['latency_ms_median']:.0f} |")
    gain = results["tiled, sliced"]["mAP_50"] - results["plain, whole image"]["mAP_50"]
    print(f"tiling + sliced inference - plain: mAP50 {gain:+.3f} (target >= +0.10)")
    (out / "small_objects.json").write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
