"""Training speed: the full loop (data, augmentation, step, validation, checkpoints) against the bare model step.

    python -m benchmarks.train_speed                          # D-FINE-n, 320 px, batch 8, the CPU, train.amp=auto
    python -m benchmarks.train_speed --images 96 --epochs 2 --device cuda

1. Bare step: the real train step (forward, float32 loss, backward, clip, AdamW) in fp32 on one synthetic
   batch, no data loading — the model's own speed on this machine (equal to the official D-FINE step, see
   README "Parity"); then the same step in the precision train.amp=auto picks here, with the loss gap.
2. Full loop: `python -m src.dl.train` on a synthetic demo data set (made in a temporary folder) with the
   config's defaults (mosaic, workers, threads, precision), timed from history.csv's epoch_time_s (training +
   validation + last.pt).
Prints loop img/s, bare fp32 img/s, their ratio (issue 15's target: >= 1.4 on a CPU with native bf16), the
precision chosen and peak RSS (this process; the loader workers separately).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from src.common.hardware import Precision, apply_channels_last, choose_precision
from src.dl.train import clip_and_step, compute_loss
from src.dl.train.optim import build_optimizer
from src.dl.train.trainer_utils import maybe_compile, seed_everything

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


def full_loop(root: Path, data: Path, args) -> dict:
    """The training stage on `data`; img/s of the last epoch (the first one also pays worker start-up)."""
    import pandas as pd

    from src.common.config import load_config
    from src.dl.train import run

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
    run(cfg)
    history = pd.read_csv(root / "output" / "speed" / "history.csv")
    last = history.iloc[-1]
    train_images = len(pd.read_csv(data / "train.csv")) // args.batch * args.batch
    return {
        "loop_img_per_s": train_images / float(last["epoch_time_s"]),
        "train_only_img_per_s": train_images / float(last["train_time_s"]),
        "validation_share": 1 - float(last["train_time_s"]) / float(last["epoch_time_s"]),
    }


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
    args = parser.parse_args(argv)
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
        with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
            data = make_data(Path(tmp), args.images)
            result.update(full_loop(Path(tmp), data, args))
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
    result["peak_rss_gib"], result["peak_rss_workers_gib"] = peak_rss_gib()
    print(
        f"{result['precision']}; peak RSS {result['peak_rss_gib']:.2f} GiB "
        f"(loader workers {result['peak_rss_workers_gib']:.2f} GiB)",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
