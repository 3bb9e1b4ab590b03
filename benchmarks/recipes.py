"""Issue 15's recipe comparison: val mAP50 against wall minutes for our recipe and the reference recipe
(ArgoHA/custom_d_fine's defaults run through this pipeline), on the demo data, at equal epochs, over seeds.

    python -m benchmarks.recipes --run [--recipes ours,reference] [--seeds 42,1] [--epochs 40] [--parallel 2]
    python -m benchmarks.recipes                 # the table from output/recipe_<recipe>_s<seed>/history.csv

--run trains each recipe x seed from scratch on data/demo (made by `make demo-data` + `make split`) into
output/recipe_<recipe>_s<seed>, `--parallel` of them at a time, 1 torch thread each (equal shares of a small
machine; a run that ends early leaves the others more CPU, which favours the slower recipe). Wall minutes are
the runs' own epoch times (training + validation + last.pt) summed: compare them within one invocation.

Targets: reach the reference's 40-epoch val mAP50 (mean over its seeds) in <= 0.5x its wall time, and beat it
at 40 epochs. Hours of CPU on a 2-core machine (the reference runs fp32 with 300 queries).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from benchmarks.seg_targets import DEMO_TRAIN, cpu_name

RECIPES = {
    # `make demo`'s from-scratch recipe: 100 queries, mosaic on every sample, MAL, background weight 2, LR 2e-3,
    # with config.yaml's defaults for the rest (amp=auto: bf16 where native, eval_every 2)
    "ours": DEMO_TRAIN,
    # config.yaml as it is (300 queries, mosaic 0.5, the fine-tuning LR table)
    "defaults": [],
    # custom_d_fine's config.yaml for D-FINE-n: same LR table, mosaic 0.8 closed for the last 5 epochs, its
    # albumentations probabilities, validation every epoch; fp32 (its AMP is CUDA-only); 300 queries
    "reference": [
        "train.amp=off",
        "train.eval_every=1",
        "train.mosaic.prob=0.8",
        "train.mosaic.no_mosaic_epochs=5",
        "train.augs.left_right_flip=0.3",
        "train.augs.rotate_90=0.05",
        "train.augs.brightness_contrast=0.02",
        "train.augs.gamma=0.02",
        "train.augs.blur=0.01",
        "train.augs.noise=0.01",
    ],
}
CHECKPOINT_EPOCHS = (8, 16, 24, 32, 40)


def exp_dir(recipe: str, seed: int) -> Path:
    return Path("output") / f"recipe_{recipe}_s{seed}"


def train(recipe: str, seed: int, epochs: int) -> int:
    command = [
        sys.executable, "-m", "src.dl.train", f"exp_name={exp_dir(recipe, seed).name}", f"seed={seed}",
        f"train.epochs={epochs}", "train.threads=1", "train.overwrite=true", *RECIPES[recipe],
    ]  # fmt: skip
    log = exp_dir(recipe, seed).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode


def curve(recipe: str, seed: int) -> pd.DataFrame | None:
    """epoch, cumulative wall minutes, val mAP50 (NaN on epochs not validated)."""
    path = exp_dir(recipe, seed) / "history.csv"
    if not path.exists():
        return None
    history = pd.read_csv(path)
    return pd.DataFrame(
        {
            "epoch": history["epoch"],
            "minutes": history["epoch_time_s"].cumsum() / 60,
            "map50": history["mAP_50"],
        }
    )


def final_test(recipe: str, seed: int) -> str:
    """best.pt's test mAP50 from metrics.csv (written when the run ended), '-' before that."""
    path = exp_dir(recipe, seed) / "metrics.csv"
    if not path.exists():
        return "-"
    metrics = pd.read_csv(path).set_index("split")
    return f"{metrics.loc['test', 'mAP_50']:.3f}" if "test" in metrics.index else "-"


def minutes_to(run: pd.DataFrame, target: float) -> float | None:
    reached = run[run["map50"] >= target]
    return None if reached.empty else float(reached["minutes"].iloc[0])


def table(recipes: list[str], seeds: list[int]) -> None:
    runs = {(r, s): c for r in recipes for s in seeds if (c := curve(r, s)) is not None}
    if not runs:
        print("no output/recipe_*/history.csv yet: `python -m benchmarks.recipes --run` trains them (hours)")
        return
    reference = [c for (r, _), c in runs.items() if r == "reference" and len(c)]
    target = (
        sum(float(c["map50"].dropna().iloc[-1]) for c in reference) / len(reference) if reference else None
    )
    print(f"CPU: {cpu_name()}; target = reference's last val mAP50, mean over seeds: {target}")
    header = " | ".join(f"ep {e}" for e in CHECKPOINT_EPOCHS)
    print(f"| recipe | seed | {header} | best (epoch) | best.pt test mAP50 | wall min | min to target |")
    for (recipe, seed), run in runs.items():
        at = []
        for epoch in CHECKPOINT_EPOCHS:
            row = run[(run["epoch"] <= epoch)].dropna(subset=["map50"]).tail(1)
            at.append(
                "-" if row.empty or int(row["epoch"].iloc[0]) < epoch - 1 else f"{row['map50'].iloc[0]:.3f}"
            )
        best = run.loc[run["map50"].idxmax()] if run["map50"].notna().any() else None
        best_text = "-" if best is None else f"{best['map50']:.3f} ({int(best['epoch'])})"
        reach = minutes_to(run, target) if target is not None else None
        print(
            f"| {recipe} | {seed} | {' | '.join(at)} | {best_text} | {final_test(recipe, seed)} | "
            f"{run['minutes'].iloc[-1]:.1f} | "
            f"{'-' if reach is None else f'{reach:.1f}'} |"
        )
    summary(runs, target)


def summary(runs: dict[tuple[str, int], pd.DataFrame], target: float | None) -> None:
    """Per recipe over its seeds: mean last val mAP50, mean minutes to the target, as a share of the
    reference's mean wall time (the target: <= 0.5)."""
    reference_wall = [c["minutes"].iloc[-1] for (r, _), c in runs.items() if r == "reference" and len(c)]
    for recipe in dict.fromkeys(r for r, _ in runs):
        curves = [c for (r, _), c in runs.items() if r == recipe and len(c)]
        last = sum(float(c["map50"].dropna().iloc[-1]) for c in curves) / len(curves)
        reach = [minutes_to(c, target) for c in curves] if target is not None else []
        text = f"{recipe}: last val mAP50 {last:.3f} (mean of {len(curves)})"
        if reach and None not in reach and reference_wall:
            mean_reach = sum(reach) / len(reach)
            share = mean_reach / (sum(reference_wall) / len(reference_wall))
            text += f"; reaches {target:.3f} in {mean_reach:.1f} min = {share:.2f}x the reference's wall time"
        print(text)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="store_true", help="train the recipes first (hours on a 2-core CPU)")
    parser.add_argument("--recipes", default="ours,reference")
    parser.add_argument("--seeds", default="42,1")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown recipe(s) {sorted(unknown)}; choose from {list(RECIPES)}")
    if args.run:
        jobs = [(r, s) for s in seeds for r in recipes]
        with ThreadPoolExecutor(args.parallel) as pool:
            codes = list(pool.map(lambda job: train(*job, args.epochs), jobs))
        if any(codes):
            print(f"failed runs: {[job for job, code in zip(jobs, codes) if code]}")
    table(recipes, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
