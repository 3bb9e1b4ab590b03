"""config.yaml's defaults against the reference recipe (ArgoHA/custom_d_fine's defaults run through this
pipeline) on demo-style data sets that no tuning used: val mAP50 against wall minutes and CPU minutes.

    python -m benchmarks.recipes --run [--recipes defaults,reference] [--data 101,202] [--seeds 42]
                                       [--epochs 40]
    python -m benchmarks.recipes [--data 101,202] ...    # the tables from output/recipe_*/history.csv

--data: the make_demo_data seeds of the data sets (data/recipe_data_<seed>: the demo generator's images,
classes and difficulty, other pictures; the demo itself uses demo_data.seed 0, the recipe was tuned there).
--run trains every recipe x data set x seed from scratch into output/recipe_<recipe>_d<data>_s<seed>, one
after another, 1 torch thread each; the training process's CPU seconds (with its loader workers) go to
<exp>/cpu.json. Wall minutes are the run's own epoch times (training + validation + last.pt) summed; on a
machine shared with other jobs compare the CPU minutes.

Target per data set: reach the reference's 40-epoch val mAP50 (mean over its seeds) in <= 0.5x its time.
Hours of CPU on a 2-core machine (the reference trains in fp32 with 300 queries, validating every epoch).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import pandas as pd

from benchmarks.seg_targets import cpu_name

RECIPES = {
    # config.yaml as it is
    "defaults": [],
    # custom_d_fine's config.yaml for D-FINE-n, every key that config.yaml's defaults could change pinned:
    # its LR table, 300 queries, 100 denoising queries, VFL, mosaic 0.8 closed for the last 5 epochs, its
    # albumentations probabilities, OneCycle, validation every epoch, fp32 (its AMP is CUDA-only)
    "reference": [
        "model.num_queries=300",
        "model.img_size=[256,256]",
        "train.batch_size=8",
        "train.lrs.n.base_lr=0.0008",
        "train.lrs.n.backbone_lr=0.0004",
        "train.scheduler=onecycle",
        "train.warmup_pct=0.1",
        "train.num_denoising=100",
        "train.cls_loss=vfl",
        "train.bg_loss_weight=1",
        "train.amp=off",
        "train.cache=off",
        "train.eval_every=1",
        "train.mosaic.prob=0.8",
        "train.mosaic.no_mosaic_epochs=5",
        "train.augs.left_right_flip=0.3",
        "train.augs.rotate_90=0.05",
        "train.augs.brightness_contrast=0.02",
        "train.augs.gamma=0.02",
        "train.augs.blur=0.01",
        "train.augs.noise=0.01",
        "train.ema_warmups=2000",
    ],
}
CHECKPOINT_EPOCHS = (8, 16, 24, 32, 40)


def data_path(data_seed: int) -> Path:
    return Path("data") / f"recipe_data_{data_seed}"


def exp_dir(recipe: str, data_seed: int, seed: int) -> Path:
    return Path("output") / f"recipe_{recipe}_d{data_seed}_s{seed}"


def make_data(data_seed: int) -> None:
    """The demo generator's data set for this seed (demo_data's other settings as configured), split."""
    data = data_path(data_seed)
    if (data / "train.csv").exists():
        return
    common = [f"data_path={data}", f"demo_data.seed={data_seed}", "demo_data.num_videos=0"]
    for stage in ("src.etl.make_demo_data", "src.etl.split"):
        subprocess.run([sys.executable, "-m", stage, *common], check=True)


def train(recipe: str, data_seed: int, seed: int, epochs: int) -> int:
    exp = exp_dir(recipe, data_seed, seed)
    command = [
        sys.executable, "-m", "src.dl.train", f"exp_name={exp.name}", f"data_path={data_path(data_seed)}",
        f"seed={seed}", f"train.epochs={epochs}", "train.threads=1", "train.overwrite=true", *RECIPES[recipe],
    ]  # fmt: skip
    log = exp.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    before = children_cpu_s()
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    if exp.exists():
        (exp / "cpu.json").write_text(json.dumps({"cpu_s": children_cpu_s() - before}))
    return code


def children_cpu_s() -> float:
    """User + system seconds of every finished child process so far (loader workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def curve(exp: Path) -> pd.DataFrame | None:
    """epoch, cumulative wall and CPU minutes, val mAP50 (NaN on epochs not validated)."""
    path = exp / "history.csv"
    if not path.exists():
        return None
    history = pd.read_csv(path)
    minutes = history["epoch_time_s"].cumsum() / 60
    cpu_path = exp / "cpu.json"
    # CPU minutes spread over the epochs as the wall time is (setup and final evaluation included)
    cpu_scale = (
        json.loads(cpu_path.read_text())["cpu_s"] / 60 / minutes.iloc[-1] if cpu_path.exists() else None
    )
    return pd.DataFrame(
        {
            "epoch": history["epoch"],
            "minutes": minutes,
            "cpu_minutes": minutes * cpu_scale if cpu_scale else float("nan"),
            "map50": history["mAP_50"],
        }
    )


def final_test(exp: Path) -> str:
    """best.pt's test mAP50 from metrics.csv (written when the run ended), '-' before that."""
    path = exp / "metrics.csv"
    if not path.exists():
        return "-"
    metrics = pd.read_csv(path).set_index("split")
    return f"{metrics.loc['test', 'mAP_50']:.3f}" if "test" in metrics.index else "-"


def reached(run: pd.DataFrame, target: float, column: str) -> float | None:
    rows = run[run["map50"] >= target]
    return None if rows.empty else float(rows[column].iloc[0])


def value_at(run: pd.DataFrame, epoch: int) -> str:
    row = run[(run["epoch"] <= epoch)].dropna(subset=["map50"]).tail(1)
    return "-" if row.empty or int(row["epoch"].iloc[0]) < epoch - 1 else f"{row['map50'].iloc[0]:.3f}"


def table(recipes: list[str], data_seeds: list[int], seeds: list[int]) -> None:
    print(f"CPU: {cpu_name()}")
    for data_seed in data_seeds:
        runs = {
            (r, s): c for r in recipes for s in seeds if (c := curve(exp_dir(r, data_seed, s))) is not None
        }
        if not runs:
            print(f"data {data_seed}: no runs yet (`python -m benchmarks.recipes --run` trains them: hours)")
            continue
        reference = [c for (r, _), c in runs.items() if r == "reference" and len(c)]
        target = (
            sum(float(c["map50"].dropna().iloc[-1]) for c in reference) / len(reference)
            if reference
            else None
        )
        print(
            f"\ndata seed {data_seed}: target = the reference's last val mAP50, mean over its seeds: {target}"
        )
        header = " | ".join(f"ep {e}" for e in CHECKPOINT_EPOCHS)
        print(f"| recipe | seed | {header} | best (epoch) | best.pt test mAP50 | wall min | CPU min | "
              "wall / CPU min to target |")  # fmt: skip
        print("|---|---|" + "--:|" * (len(CHECKPOINT_EPOCHS) + 5))
        for (recipe, seed), run in runs.items():
            at = " | ".join(value_at(run, epoch) for epoch in CHECKPOINT_EPOCHS)
            best = run.loc[run["map50"].idxmax()] if run["map50"].notna().any() else None
            best_text = "-" if best is None else f"{best['map50']:.3f} ({int(best['epoch'])})"
            to_target = "-"
            if target is not None and (wall := reached(run, target, "minutes")) is not None:
                to_target = f"{wall:.1f} / {reached(run, target, 'cpu_minutes'):.1f}"
            print(
                f"| {recipe} | {seed} | {at} | {best_text} | {final_test(exp_dir(recipe, data_seed, seed))} | "
                f"{run['minutes'].iloc[-1]:.1f} | {run['cpu_minutes'].iloc[-1]:.1f} | {to_target} |"
            )
        summary(runs, target)


def summary(runs: dict[tuple[str, int], pd.DataFrame], target: float | None) -> None:
    """Per recipe over its seeds: mean last val mAP50, mean wall / CPU minutes to the target, as a share of
    the reference's mean wall / CPU minutes (the target: <= 0.5)."""
    reference = [c for (r, _), c in runs.items() if r == "reference" and len(c)]
    for recipe in dict.fromkeys(r for r, _ in runs):
        curves = [c for (r, _), c in runs.items() if r == recipe and len(c)]
        last = sum(float(c["map50"].dropna().iloc[-1]) for c in curves) / len(curves)
        text = f"{recipe}: last val mAP50 {last:.3f} (mean of {len(curves)})"
        for column, unit in (("minutes", "wall"), ("cpu_minutes", "CPU")):
            reach = [reached(c, target, column) for c in curves] if target is not None else []
            if reach and None not in reach and reference:
                mean_reach = sum(reach) / len(reach)
                share = mean_reach / (sum(c[column].iloc[-1] for c in reference) / len(reference))
                text += (
                    f"; reaches {target:.3f} in {mean_reach:.1f} {unit} min = {share:.2f}x the reference's"
                )
        print(text)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="store_true", help="train the recipes first (hours on a 2-core CPU)")
    parser.add_argument("--recipes", default="defaults,reference")
    parser.add_argument("--data", default="101,202", help="make_demo_data seeds of the data sets")
    parser.add_argument("--seeds", default="42", help="training seeds")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    data_seeds = [int(s) for s in args.data.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown recipe(s) {sorted(unknown)}; choose from {list(RECIPES)}")
    if args.run:
        failed = []
        for data_seed in data_seeds:
            make_data(data_seed)
            for seed in seeds:
                for recipe in recipes:
                    if train(recipe, data_seed, seed, args.epochs):
                        failed.append((recipe, data_seed, seed))
        if failed:
            print(f"failed runs: {failed}")
    table(recipes, data_seeds, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
