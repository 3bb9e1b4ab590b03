"""Training speed: the full loop (data, augmentation, step, validation, checkpoints) against the bare model step.

    python -m benchmarks.train_speed                          # D-FINE-n, 320 px, batch 8, the CPU, train.amp=auto
    python -m benchmarks.train_speed --profile                # + where the timed epoch's time went
    python -m benchmarks.train_speed --images 96 --epochs 2 --device cuda
    python -m benchmarks.train_speed --under-load             # 1 vs 2 threads beside a busy process

1. Bare step: the real train step (forward, float32 loss, backward, clip, AdamW) in fp32 on one synthetic
   batch, no data loading — the model's own speed on this machine (equal to the official D-FINE step, see
   README "Parity"); then the same step in the precision train.amp=auto picks here, with the loss gap.
2. Full loop: `python -m src.dl.train` on a synthetic demo data set (made in a temporary folder) with the
   config's defaults (mosaic, workers, threads, precision), timed from history.csv's epoch_time_s (training +
   validation + last.pt).
Prints loop img/s, bare fp32 img/s, their ratio (the target: >= 1.4 on a CPU with native bf16), the
precision chosen and peak RSS (this process; the loader workers separately).
--profile: the timed epoch split into loader wait, host to device (+ channels_last), forward, loss, the
matcher (inside the loss), backward, optimizer, EMA, logging, checkpoint and validation (src/dl/train/profile.py).
--under-load: the bare fp32 step in fresh processes at 1 and 2 threads while another process keeps a core
busy, with OpenMP's default spin-wait and with the wait policy of src/common/threads.py.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from src.common.hardware import Precision, apply_channels_last, choose_precision
from src.common.threads import WAIT_POLICY
from src.dl.train import clip_and_step, compute_loss
from src.dl.train.optim import build_optimizer
from src.dl.train.rng import seed_everything
from src.dl.train.speed import maybe_compile

NUM_CLASSES = 4


def synthetic_batch(batch: int, img_size: int, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, img_size, img_size, generator=generator).to(device)
    targets = []
    for _ in range(batch):
        n = 3
        centres = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
        sizes = 0.05 + 0.25 * torch.rand(n, 2, generator=generator)
        targets.append(
            {
                "labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator).to(device),
                "boxes": torch.cat([centres, sizes], dim=1).to(device),
            }
        )
    return images, targets


def bare_step(
    model_name: str,
    img_size: int,
    batch: int,
    precision: Precision,
    steps: int,
    warmup: int,
    device,
    compile_model: bool = False,
) -> dict:
    """img/s of the train step alone on one synthetic batch (same weights and batch for every precision);
    first_step_s: the first step's time (with compile_model: torch.compile's compile time)."""
    from src.models import build_criterion, build_model

    seed_everything(0)
    model = build_model(model_name, NUM_CLASSES, img_size=(img_size, img_size)).to(device).train()
    apply_channels_last(model, precision)
    forward = maybe_compile(model, compile_model)
    criterion = build_criterion(model_name, NUM_CLASSES).to(device).train()
    optimizer = build_optimizer(model, base_lr=8e-4, backbone_lr=4e-4, weight_decay=1.25e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.grad_scaler)
    images, targets = synthetic_batch(batch, img_size, device)
    losses, first_step_s, started = [], 0.0, time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            started = time.perf_counter()
        torch.manual_seed(step)  # the same denoising queries in every precision
        loss, _ = compute_loss(forward, criterion, images, targets, precision.dtype)
        scaler.scale(loss).backward()
        clip_and_step(model, optimizer, scaler, clip_max_norm=0.1)
        losses.append(float(loss.detach()))
        first_step_s = first_step_s or time.perf_counter() - started
    _sync(device)
    elapsed = time.perf_counter() - started
    img_per_s = steps * batch / elapsed
    return {
        "precision": precision.name,
        "img_per_s": img_per_s,
        "losses": losses,
        "first_step_s": first_step_s,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(root: Path, images: int) -> Path:
    """A synthetic demo data set (no negatives, no videos) split into train / val / test."""
    from src.common.config import load_config
    from src.etl import make_demo_data, split

    data = root / "data"
    demo = [f"data_path={data}", f"demo_data.num_images={images}", "demo_data.num_negatives=0"]
    make_demo_data.run(load_config([*demo, "demo_data.num_videos=0"]))
    split.run(load_config([f"data_path={data}", f"check.report_dir={root / 'report'}"]))
    return data


def full_loop(root: Path, data: Path, args, timer=None) -> dict:
    """The training stage on `data`; img/s of the last epoch (the first one also pays worker start-up).
    timer: a SectionTimer that ends up holding the last epoch's sections."""
    import pandas as pd

    from src.common.config import load_config
    from src.dl.train import run
    from src.dl.train.profile import NO_TIMER

    overrides = [
        f"data_path={data}",
        f"output_dir={root / 'output'}",
        "exp_name=speed",
        f"device={args.device}",
        f"model.name={args.model}",
        f"model.img_size=[{args.img_size},{args.img_size}]",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}",
        f"train.amp={args.amp}",
        f"train.cache={args.cache}",
        f"check.report_dir={root / 'report'}",
        "train.checkpoint_every_minutes=0",
        "train.mosaic.no_mosaic_epochs=0",  # the timed epoch keeps the default mosaic share
        *([f"train.threads={args.threads}"] if args.threads else []),
        *([f"train.num_workers={args.workers}"] if args.workers is not None else []),
    ]
    cfg = load_config(overrides)

    def last_epoch_only(epoch: int) -> None:
        if timer is not None and epoch == args.epochs - 1:
            timer.reset()

    run(cfg, [{"on_epoch_start": last_epoch_only}], timer=timer or NO_TIMER)
    history = pd.read_csv(root / "output" / "speed" / "history.csv")
    last = history.iloc[-1]
    train_images = len(pd.read_csv(data / "train.csv")) // args.batch * args.batch
    return {
        "loop_epoch_s": float(last["epoch_time_s"]),
        "loop_images": train_images,
        "loop_img_per_s": train_images / float(last["epoch_time_s"]),
        "train_only_img_per_s": train_images / float(last["train_time_s"]),
        "validation_share": 1 - float(last["train_time_s"]) / float(last["epoch_time_s"]),
    }


# The loop's sections in the order a batch meets them; the matcher runs inside the loss.
SECTIONS = (
    "loader wait", "host to device", "forward", "loss", "matcher", "backward", "optimizer", "ema", "logging",
    "checkpoint", "validation",
)  # fmt: skip


def profile_lines(totals: dict[str, float], epoch_s: float, images: int) -> list[str]:
    """One line per section: seconds, share of the epoch, ms per training image; the loss without the
    matcher's share; what no section covers as "other"."""
    seconds = {name: totals.get(name, 0.0) for name in SECTIONS}
    seconds["loss"] -= seconds["matcher"]
    seconds["other"] = max(epoch_s - sum(seconds.values()), 0.0)
    return [
        f"  {('loss (without matcher)' if name == 'loss' else name):<24}{value:8.2f} s {value / epoch_s:7.1%} "
        f"{1000 * value / images:8.1f} ms/img"
        for name, value in seconds.items()
    ]


# OpenMP waits compared by --under-load: libgomp's / libiomp's defaults (what torch had before
# src/common/threads.py), no spinning at all, and src/common/threads.py's short spin.
WAITS = {
    "default spin": {"GOMP_SPINCOUNT": "300000", "KMP_BLOCKTIME": "200"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"},
    "threads.py": dict(WAIT_POLICY),
}


def bare_step_in_process(threads: int, wait: dict[str, str], args) -> float:
    """fp32 bare-step img/s of a fresh process (OpenMP reads its wait policy when torch loads)."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in {"OMP_WAIT_POLICY", *WAIT_POLICY}} | wait
    command = [
        sys.executable, "-m", "benchmarks.train_speed", "--skip-loop", "--amp", "off", "--bare-threads",
        str(threads), "--model", args.model, "--img-size", str(args.img_size), "--batch", str(args.batch),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(re.search(r"fp32 ([0-9.]+) img/s", done.stdout).group(1))


def under_load(args) -> dict:
    """1 and 2 threads, each OpenMP wait, while --competitors busy processes run; median img/s of
    --repeats interleaved runs."""
    import os
    import statistics
    import subprocess
    import sys

    settings = [(1, "threads.py")] + [(2, name) for name in WAITS]
    runs: dict[str, list[float]] = {f"{n} thread(s), {name}": [] for n, name in settings}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.competitors)]
    try:
        for _ in range(args.repeats):
            for threads, name in settings:
                runs[f"{threads} thread(s), {name}"].append(bare_step_in_process(threads, WAITS[name], args))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    result = {key: statistics.median(values) for key, values in runs.items()}
    print(
        f"bare fp32 step, D-FINE-{args.model} {args.img_size}px batch {args.batch}, beside {args.competitors} "
        f"busy process(es), load average {os.getloadavg()[0]:.1f}; median of {args.repeats}:"
    )
    for key, values in runs.items():
        print(f"  {key:<32}{result[key]:6.2f} img/s  ({', '.join(f'{v:.2f}' for v in values)})")
    return result


def peak_rss_gib() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child (loader workers), GiB."""
    kib = 2**20  # ru_maxrss is KiB on Linux
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="n")
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed bare steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="demo images made for the loop")
    parser.add_argument("--epochs", type=int, default=2, help="loop epochs; the last one is timed")
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--cache", default="off", help="train.cache for the loop: off | ram | disk")
    parser.add_argument("--threads", type=int, default=None, help="train.threads (default: automatic)")
    parser.add_argument(
        "--workers", type=int, default=None, help="train.num_workers (default: config.yaml's)"
    )
    parser.add_argument("--bare-threads", type=int, default=None, help="bare step threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-loop", action="store_true", help="bare steps only")
    parser.add_argument("--compile", action="store_true", help="also time the bare step under torch.compile")
    parser.add_argument("--profile", action="store_true", help="split the timed loop epoch into its sections")
    parser.add_argument("--under-load", action="store_true", help="1 vs 2 threads beside a busy process")
    parser.add_argument("--repeats", type=int, default=3, help="--under-load: runs of each setting")
    parser.add_argument("--competitors", type=int, default=1, help="--under-load: busy processes beside it")
    args = parser.parse_args(argv)
    if args.under_load:
        return under_load(args)
    device = torch.device(args.device)
    if args.bare_threads:
        torch.set_num_threads(args.bare_threads)
    chosen, fp32_precision, threads = (
        choose_precision(args.amp, device),
        choose_precision("off", device),
        torch.get_num_threads(),
    )
    fp32 = bare_step(args.model, args.img_size, args.batch, fp32_precision, args.steps, args.warmup, device)
    result = {"precision": chosen.describe(), "bare_fp32_img_per_s": fp32["img_per_s"]}
    if chosen.dtype is not None:
        fast = bare_step(args.model, args.img_size, args.batch, chosen, args.steps, args.warmup, device)
        gaps = [abs(a - b) / abs(a) for a, b in zip(fp32["losses"], fast["losses"], strict=True)]
        result.update(bare_chosen_img_per_s=fast["img_per_s"], loss_gap_max=max(gaps))
    print(
        f"bare step D-FINE-{args.model} {args.img_size}px batch {args.batch} ({torch.get_num_threads()} threads): "
        f"fp32 {fp32['img_per_s']:.2f} img/s"
        + (
            f", {chosen.name} {result['bare_chosen_img_per_s']:.2f} img/s, loss within {result['loss_gap_max']:.2%}"
            if chosen.dtype is not None
            else ""
        ),
        flush=True,
    )
    if args.compile:
        compiled = bare_step(
            args.model, args.img_size, args.batch, chosen, args.steps, args.warmup, device, compile_model=True
        )
        result.update(compiled_img_per_s=compiled["img_per_s"], compile_first_step_s=compiled["first_step_s"])
        print(
            f"bare step under torch.compile ({chosen.name}): first step {compiled['first_step_s']:.0f} s, "
            f"then {compiled['img_per_s']:.2f} img/s",
            flush=True,
        )
    if not args.skip_loop:
        from src.dl.train.profile import SectionTimer

        timer = SectionTimer(device) if args.profile else None
        with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
            data = make_data(Path(tmp), args.images)
            result.update(full_loop(Path(tmp), data, args, timer))
        # A shared machine's load drifts: the bare step again after the loop, the ratio against their mean.
        torch.set_num_threads(threads)  # the loop set train.threads
        again = bare_step(
            args.model, args.img_size, args.batch, fp32_precision, args.steps, args.warmup, device
        )
        bare = (fp32["img_per_s"] + again["img_per_s"]) / 2
        result.update(
            bare_fp32_after_img_per_s=again["img_per_s"],
            ratio_loop_to_bare_fp32=result["loop_img_per_s"] / bare,
        )
        print(
            f"full loop ({chosen.name}, {args.images} demo images, validation included): "
            f"{result['loop_img_per_s']:.2f} img/s (training alone {result['train_only_img_per_s']:.2f}, "
            f"validation {result['validation_share']:.0%} of the epoch); bare fp32 step before / after: "
            f"{fp32['img_per_s']:.2f} / {again['img_per_s']:.2f} img/s; "
            f"loop / bare fp32 step = {result['ratio_loop_to_bare_fp32']:.2f}x",
            flush=True,
        )
        if timer is not None:
            result["profile_s"] = dict(timer.totals)
            print(f"last epoch ({result['loop_epoch_s']:.1f} s, {result['loop_images']} training images):")
            print(
                "\n".join(profile_lines(timer.totals, result["loop_epoch_s"], result["loop_images"])),
                flush=True,
            )
    result["peak_rss_gib"], result["peak_rss_workers_gib"] = peak_rss_gib()
    print(
        f"{result['precision']}; peak RSS {result['peak_rss_gib']:.2f} GiB "
        f"(loader workers {result['peak_rss_workers_gib']:.2f} GiB)",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
