"""Issue 14's accuracy and cost targets: a detection and a segmentation D-FINE trained with the same recipe on
the demo data with polygon labels.

    python -m benchmarks.seg_targets [--epochs 16] [--size n] [--out output/bench_seg] [--workers 2]
                                     [--tasks detect,segment] [--extra key=value ...]

Makes the demo data with polygons (demo_data.polygons=true) once under <out>/data, splits it, then trains
`model.task=detect` and `model.task=segment` (each in its own process, the `make demo` recipe: DEMO_TRAIN
below) and reports on val: box mAP50 of both, mask mAP50 of the segmentation model, the training step time
ratio (train time per step, data loading included: the loader workers move the masks) and the peak RSS
ratio (the training process plus its largest loader worker). Targets: box mAP50 within 0.03 of the
detector's, mask mAP50 >= 0.9 x its own box mAP50, step <= 1.3x, memory <= 1.3x. Writes
<out>/seg_targets.json. A run trains two models from scratch: minutes per epoch on a 2-core CPU.
`--tasks segment` trains only the segmentation model (e.g. to compare two mask branches at one recipe):
its figures, no ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pandas as pd

# `make demo`'s from-scratch recipe (Makefile DEMO_TRAIN), the epochs aside.
DEMO_TRAIN = [
    "model.num_queries=100",
    "train.mosaic.prob=1.0",
    "train.cls_loss=mal",
    "train.bg_loss_weight=2",
    "train.lrs.n.base_lr=0.002",
    "train.lrs.n.backbone_lr=0.002",
]
TARGETS = {"box_gap": 0.03, "mask_over_box": 0.9, "step_ratio": 1.3, "memory_ratio": 1.3}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def prepare_data(out: Path) -> Path:
    """The demo data with polygon labels under <out>/data, made and split once (re-used by later runs)."""
    data = out / "data"
    if not (data / "train.csv").exists():
        common = [f"data_path={data}", "demo_data.polygons=true"]
        subprocess.run([sys.executable, "-m", "src.etl.make_demo_data", *common], check=True)
        subprocess.run([sys.executable, "-m", "src.etl.split", *common], check=True)
    return data


def train_child(task: str, overrides: list[str]) -> None:
    """In a child process: train, then print this process's and its loader workers' peak RSS as JSON."""
    from src.common.config import load_config
    from src.dl.train import run

    run(load_config(overrides))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"task": task, "peak_rss_mb": own, "worker_peak_rss_mb": workers}))


def train(task: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    overrides = [
        f"data_path={data}",
        f"output_dir={out}",
        f"exp_name={task}",
        f"model.name={args.size}",
        f"model.task={task}",
        f"train.epochs={args.epochs}",
        f"train.num_workers={args.workers}",
        "train.overwrite=true",
        *DEMO_TRAIN,
        *args.extra,
    ]
    command = [sys.executable, "-m", "benchmarks.seg_targets", "--child", task, *overrides]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{task} training failed:\n{result.stderr[-3000:]}")
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    exp = out / task
    history, metrics = pd.read_csv(exp / "history.csv"), pd.read_csv(exp / "metrics.csv")
    val = metrics[metrics["split"] == "val"].iloc[0]
    return {
        "box_mAP_50": float(val["mAP_50"]),
        "mask_mAP_50": float(val["mask_mAP_50"]) if "mask_mAP_50" in val else None,
        "train_time_s": float(history["train_time_s"].sum()),
        "peak_rss_mb": memory["peak_rss_mb"] + memory["worker_peak_rss_mb"],
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        return train_child(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=16, help="the make demo recipe's 16; fewer = a short check"
    )
    parser.add_argument("--size", default="n")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("output/bench_seg"))
    parser.add_argument("--tasks", default="detect,segment", help="comma-separated: detect, segment or both")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more key=value overrides for every run (e.g. an A/B change)"
    )
    args = parser.parse_args(argv)
    tasks = [task for task in ("detect", "segment") if task in args.tasks.split(",")]
    data = prepare_data(args.out)
    runs = {task: train(task, data, args.out, args) for task in tasks}
    recipe = {
        "size": args.size,
        "epochs": args.epochs,
        "workers": args.workers,
        "overrides": DEMO_TRAIN + args.extra,
    }
    report = {"cpu": cpu_name(), "recipe": recipe, "runs": runs}
    print(f"CPU: {report['cpu']}; D-FINE-{args.size}, {args.epochs} epochs, make demo recipe")
    print_runs(runs)
    if len(runs) == 2:
        report.update(compare(runs["detect"], runs["segment"]))
        for key, limit in TARGETS.items():
            verdict = "met" if report["targets_met"][key] else "NOT met"
            sign = "<=" if key != "mask_over_box" else ">="
            print(f"{key}: {report[key]:.3f} (target {sign} {limit}) {verdict}")
    (args.out / "seg_targets.json").write_text(json.dumps(report, indent=2))


def print_runs(runs: dict) -> None:
    print("| model | val box mAP50 | val mask mAP50 | train time (s) | peak RSS (MiB) |")
    print("|:--|--:|--:|--:|--:|")
    for task, r in runs.items():
        mask = "-" if r["mask_mAP_50"] is None else f"{r['mask_mAP_50']:.3f}"
        print(
            f"| {task} | {r['box_mAP_50']:.3f} | {mask} | {r['train_time_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )


def compare(det: dict, seg: dict) -> dict:
    """Issue 14's ratios of the segmentation run to the detection run, and which targets they meet."""
    report = {
        "box_gap": det["box_mAP_50"] - seg["box_mAP_50"],
        "mask_over_box": seg["mask_mAP_50"] / max(seg["box_mAP_50"], 1e-9),
        "step_ratio": seg["train_time_s"]
        / max(det["train_time_s"], 1e-9),  # same steps: same images, batches
        "memory_ratio": seg["peak_rss_mb"] / max(det["peak_rss_mb"], 1e-9),
    }
    report["targets_met"] = {
        "box_gap": report["box_gap"] <= TARGETS["box_gap"],
        "mask_over_box": report["mask_over_box"] >= TARGETS["mask_over_box"],
        "step_ratio": report["step_ratio"] <= TARGETS["step_ratio"],
        "memory_ratio": report["memory_ratio"] <= TARGETS["memory_ratio"],
    }
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
