"""Fine-tuning from a checkpoint of our own in the official format against training from scratch, per family.

    python -m benchmarks.finetune [--out output/bench_finetune] [--families dfine,rtdetrv2,detr]
                                  [--images 100] [--batch 4] [--img-size 160] [--epochs 10] [--target 0.2]

1. Two demo sets (src/etl/make_demo_data.py), made and split once under <out>/data_a and <out>/data_b:
   A = seed 0 with 3 classes (circle, square, triangle), B = seed 1 with 2 classes (star, square).
2. Per family at its smallest size (D-FINE-n, RT-DETRv2-R18, DETR-R50), one training at a time:
   train A from scratch -> `src.dl.save_official` (the family's official file) -> train B from that file
   (train.pretrained_model_path) and B from scratch: same recipe, seed and epochs, no other pretrained
   weights anywhere (no ImageNet backbone).
3. Val mAP50 of every epoch (history.csv); prints and writes <out>/finetune.json: per family the epochs B
   needs to reach --target mAP50 each way, B's final and best mAP50, and the wall time of each run.
Tens of minutes on a 2-core CPU (DETR most of it); run it under `nice -n 10`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks.seg_targets import cpu_name

SETS = {  # name -> (demo_data.seed, label_to_name)
    "a": (0, "{0: circle, 1: square, 2: triangle}"),
    "b": (1, "{0: star, 1: square}"),
}
# Per family: the smallest size and the recipe shared by all three of its runs. From scratch on ~100 images
# the official learning rates learn too slowly, so each family gets one raised learning rate (the `make demo`
# one for D-FINE-n); DETR keeps its queries within a 160 px input's 5x5 stride-32 grid.
FAMILIES = {
    "dfine": [
        "model.arch=dfine", "model.name=n", "model.num_queries=100", "train.cls_loss=mal",
        "train.bg_loss_weight=2", "train.lrs.n.base_lr=0.002", "train.lrs.n.backbone_lr=0.002",
    ],
    "rtdetrv2": [
        "model.arch=rtdetrv2", "model.name=r18", "model.num_queries=100",
        "++train.lrs.r18={base_lr: 0.0005, backbone_lr: 0.0005}",
    ],
    "detr": [
        "model.arch=detr", "model.name=r50", "model.num_queries=25",
        "train.lrs.r50.base_lr=0.0002", "train.lrs.r50.backbone_lr=0.0002",
    ],
}  # fmt: skip


def prepare(out: Path, name: str, images: int, img_size: int) -> Path:
    """<out>/data_<name>: a demo set of `images` labelled images, split (made once, re-used after)."""
    seed, classes = SETS[name]
    data = out / f"data_{name}"
    if not (data / "train.csv").exists():
        common = [f"data_path={data}", f"label_to_name={classes}"]
        demo = [
            f"demo_data.seed={seed}", f"demo_data.num_images={images}", "demo_data.num_negatives=0",
            "demo_data.num_videos=0", f"demo_data.min_size={img_size}", f"demo_data.max_size={img_size * 4 // 3}",
        ]  # fmt: skip
        subprocess.run([sys.executable, "-m", "src.etl.make_demo_data", *common, *demo], check=True)
        subprocess.run([sys.executable, "-m", "src.etl.split", *common], check=True)
    return data


def train(out: Path, exp: str, data: Path, set_name: str, recipe: list[str], args, *extra: str) -> dict:
    """One training run in a child process; its val mAP50 per epoch and its wall time."""
    overrides = [
        f"data_path={data}", f"output_dir={out / 'runs'}", f"exp_name={exp}", f"label_to_name={SETS[set_name][1]}",
        f"model.img_size=[{args.img_size},{args.img_size}]", f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}", "train.eval_every=1",
        "train.mosaic.prob=1.0", "train.debug_images=0", "train.eval_images=0", "train.overwrite=true",
        "seed=42", *recipe, *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "src.dl.train", *overrides], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{exp} failed:\n{result.stderr[-3000:]}")
    history = pd.read_csv(out / "runs" / exp / "history.csv")
    scored = history.dropna(subset=["mAP_50"])
    log = (out / "runs" / exp / "train_log.txt").read_text()
    report = [line.strip() for line in log.splitlines() if "reused:" in line or "re-initialised" in line]
    return {
        "epochs": [int(e) for e in scored["epoch"]],
        "mAP_50": [round(float(v), 4) for v in scored["mAP_50"]],
        "wall_s": round(wall, 1),
        "load_report": report,
    }


def epochs_to(run: dict, target: float) -> int | None:
    return next((e for e, v in zip(run["epochs"], run["mAP_50"]) if v >= target), None)


def run_family(out: Path, family: str, sets: dict[str, Path], args) -> dict:
    recipe = FAMILIES[family]
    a = train(out, f"{family}_a", sets["a"], "a", recipe, args)
    saver = [
        sys.executable,
        "-m",
        "src.dl.save_official",
        f"output_dir={out / 'runs'}",
        f"exp_name={family}_a",
    ]
    subprocess.run(saver, check=True, capture_output=True)
    official = next((out / "runs" / f"{family}_a").glob(f"{family}_*_{family}_a.pth"))
    tuned = train(
        out, f"{family}_b_tuned", sets["b"], "b", recipe, args, f"train.pretrained_model_path={official}"
    )
    scratch = train(out, f"{family}_b_scratch", sets["b"], "b", recipe, args)
    return {
        "a": a,
        "b_tuned": tuned,
        "b_scratch": scratch,
        "official_file": str(official),
        "epochs": args.epochs,
    }


def table(results: dict, target: float) -> str:
    lines = [
        f"| model | epochs | A final mAP50 | B epochs to mAP50 {target} (fine-tuned / scratch) | B fine-tuned: "
        "epochs to scratch's final | B final mAP50 (fine-tuned / scratch) | B best mAP50 (fine-tuned / scratch) | "
        "wall min (A, B tuned, B scratch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, r in results.items():
        tuned, scratch = r["b_tuned"], r["b_scratch"]
        reach = " / ".join(str(epochs_to(x, target) or "not reached") for x in (tuned, scratch))
        final = " / ".join(f"{x['mAP_50'][-1]:.3f}" for x in (tuned, scratch))
        best = " / ".join(f"{max(x['mAP_50']):.3f}" for x in (tuned, scratch))
        catch_up = epochs_to(tuned, scratch["mAP_50"][-1])
        wall = ", ".join(f"{r[k]['wall_s'] / 60:.1f}" for k in ("a", "b_tuned", "b_scratch"))
        lines.append(
            f"| {family} | {r['epochs']} | {r['a']['mAP_50'][-1]:.3f} | {reach} | {catch_up} of {r['epochs']} | {final} | {best} | {wall} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("output/bench_finetune"))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4, help="small: more optimizer steps on few images")
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=10, help="of every run of the families given")
    parser.add_argument("--target", type=float, default=0.2, help="the val mAP50 B must reach")
    parser.add_argument("--table", action="store_true", help="only print the table of <out>/finetune.json")
    args = parser.parse_args(argv)
    report_path = args.out / "finetune.json"
    if args.table:
        print(table(json.loads(report_path.read_text())["results"], args.target))
        return
    families = args.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    sets = {name: prepare(args.out, name, args.images, args.img_size) for name in SETS}
    results = json.loads(report_path.read_text())["results"] if report_path.exists() else {}
    for family in families:
        results[family] = run_family(args.out, family, sets, args)
        meta = {"cpu": cpu_name(), "args": {k: str(v) for k, v in vars(args).items()}}
        report_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"{family}: B val mAP50 per epoch, fine-tuned {results[family]['b_tuned']['mAP_50']}, "
              f"scratch {results[family]['b_scratch']['mAP_50']}", flush=True)  # fmt: skip
    print(table(results, args.target))


if __name__ == "__main__":
    main(sys.argv[1:])
