"""`make demo` timed stage by stage, once per training seed: where its minutes go and the model it ends with.

    python -m benchmarks.demo_time [--seeds 42,1] [--make=VAR=value ...] [--out output/demo_time]
    python -m benchmarks.demo_time --report      # the tables again, from <out>

Each seed runs the real `make demo ARGS="seed=<seed>"` (the images are the same for every seed: they follow
demo_data.seed; the seed changes the train/val/test split, the initial weights and the augmentation)
with benchmarks/timed_shell.py as make's SHELL, which records every recipe line's wall and CPU seconds
(user + system of the stage and its loader workers) and the load average. After each run the experiment's
history.csv and metrics.csv are copied to <out>/s<seed>_*.csv. Printed: the time per stage,
val mAP50 per epoch of every seed, and best.pt's val / test mAP50 with the mean over seeds (the target:
mean val mAP50 >= 0.80, every seed >= 0.75, the whole `make demo` <= 15 minutes on an idle 2-core CPU).

On a machine shared with other jobs the wall times stretch with the load; the CPU seconds do not (much):
compare those, and time the wall on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

SHELL = Path(__file__).with_name("timed_shell.py").resolve()
EXPERIMENT = Path("output") / "demo"  # make demo's exp_name


def stage_name(command: str) -> str:
    found = re.search(r"-m (src\.[\w.]+)", command)
    return found.group(1).rsplit(".", 1)[-1] if found else command.split()[0]


def run_seed(seed: int, out: Path, make_vars: list[str]) -> int:
    log = out / f"s{seed}_steps.jsonl"
    log.unlink(missing_ok=True)
    command = ["make", "demo", f"SHELL={SHELL}", f"ARGS=seed={seed}", *make_vars]
    print(" ".join(command), flush=True)
    code = subprocess.run(command, env=os.environ | {"DEMO_TIME_LOG": str(log.resolve())}).returncode
    for name in ("history.csv", "metrics.csv"):
        if (EXPERIMENT / name).exists():
            shutil.copyfile(EXPERIMENT / name, out / f"s{seed}_{name}")
    return code


def stage_table(out: Path, seeds: list[int]) -> None:
    print("\n| seed | " + " | ".join(["stage", "wall s", "CPU s", "load average (start-end)"]) + " |")
    print("|---|---|--:|--:|---|")
    for seed in seeds:
        log = out / f"s{seed}_steps.jsonl"
        if not log.exists():
            continue
        steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = [s for s in steps if not s["command"].lstrip().startswith("echo")]  # the closing message
        for step in steps:
            load = f"{step['load_before']:.1f}-{step['load_after']:.1f}"
            print(
                f"| {seed} | {stage_name(step['command'])} | {step['wall_s']:.0f} | {step['cpu_s']:.0f} | {load} |"
            )
        wall, cpu = sum(s["wall_s"] for s in steps), sum(s["cpu_s"] for s in steps)
        print(f"| {seed} | **make demo** | **{wall:.0f}** ({wall / 60:.1f} min) | **{cpu:.0f}** | |")


def curve_table(out: Path, seeds: list[int]) -> None:
    curves = {}
    for seed in seeds:
        path = out / f"s{seed}_history.csv"
        if path.exists():
            history = pd.read_csv(path)
            curves[seed] = history.set_index("epoch")[["mAP_50", "epoch_time_s"]]
    if not curves:
        return
    epochs = sorted({e for c in curves.values() for e in c.index})
    print("\n| epoch | " + " | ".join(f"seed {s}: val mAP50 | min" for s in curves) + " |")
    print("|--:|" + "--:|--:|" * len(curves))
    for epoch in epochs:
        cells = []
        for curve in curves.values():
            if epoch not in curve.index:
                cells += ["", ""]
                continue
            value = curve.loc[epoch, "mAP_50"]
            minutes = curve.loc[:epoch, "epoch_time_s"].sum() / 60
            cells += ["" if pd.isna(value) else f"{value:.3f}", f"{minutes:.1f}"]
        print(f"| {epoch} | " + " | ".join(cells) + " |")


def final_table(out: Path, seeds: list[int]) -> None:
    rows = []
    for seed in seeds:
        path = out / f"s{seed}_metrics.csv"
        if path.exists():
            metrics = pd.read_csv(path).set_index("split")
            rows.append((seed, metrics.loc["val", "mAP_50"], metrics.loc["test", "mAP_50"]))
    if not rows:
        return
    print("\n| seed | best.pt val mAP50 | test mAP50 |\n|---|--:|--:|")
    for seed, val, test in rows:
        print(f"| {seed} | {val:.3f} | {test:.3f} |")
    vals = [v for _, v, _ in rows]
    print(f"| mean | **{sum(vals) / len(vals):.3f}** (lowest {min(vals):.3f}) | "
          f"{sum(t for *_, t in rows) / len(rows):.3f} |")  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="42,1")
    parser.add_argument(
        "--make", action="append", default=[], help="an extra make argument (repeatable): --make=VENV=/x/.venv"
    )
    parser.add_argument("--out", type=Path, default=Path("output") / "demo_time")
    parser.add_argument("--report", action="store_true", help="print the tables of an earlier run only")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        failed = [seed for seed in seeds if run_seed(seed, args.out, args.make)]
        if failed:
            print(f"make demo failed for seed(s) {failed}")
    stage_table(args.out, seeds)
    curve_table(args.out, seeds)
    final_table(args.out, seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
