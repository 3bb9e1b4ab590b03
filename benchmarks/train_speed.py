"""Training throughput of the real train step (forward under autocast, float32 loss, backward, clip, AdamW).

    python -m benchmarks.train_speed                       # D-FINE-n, 320 px, batch 4, CPU fp32 and bf16
    python -m benchmarks.train_speed --amp off --steps 20 --device cuda

Synthetic images and boxes (seeded), so data loading is not part of the number: this is the model's
training speed on this machine. Memory: peak GPU memory on CUDA, peak resident memory of the process on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from src.common.hardware import choose_precision
from src.dl.train import clip_and_step, compute_loss
from src.dl.train.optim import build_optimizer
from src.dl.train.trainer_utils import memory_used_gb, seed_everything

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


def measure(
    model_name: str, img_size: int, batch: int, amp: str, steps: int, warmup: int, device: torch.device
) -> dict:
    from src.d_fine import build_criterion, build_model

    seed_everything(0)
    amp_dtype = choose_precision(amp, device).dtype
    model = build_model(model_name, NUM_CLASSES, img_size=(img_size, img_size)).to(device).train()
    criterion = build_criterion(model_name, NUM_CLASSES).to(device).train()
    optimizer = build_optimizer(model, base_lr=8e-4, backbone_lr=4e-4, weight_decay=1.25e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    images, targets = synthetic_batch(batch, img_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak_memory, losses, started = 0.0, [], time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        loss, _ = compute_loss(model, criterion, images, targets, amp_dtype)
        scaler.scale(loss).backward()
        clip_and_step(model, optimizer, scaler, clip_max_norm=0.1)
        losses.append(float(loss.detach()))
        peak_memory = max(peak_memory, memory_used_gb(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    return {
        "model": model_name,
        "img_size": img_size,
        "batch": batch,
        "amp": amp,
        "img_per_s": round(steps * batch / elapsed, 2),
        "s_per_step": round(elapsed / steps, 3),
        "peak_memory_gb": round(peak_memory, 2),
        "first_loss": round(losses[0], 3),
        "last_loss": round(losses[-1], 3),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="n")
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--amp", nargs="+", default=["off", "bf16"], help="any of off, bf16, fp16 (fp16: CUDA)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for amp in args.amp:
        row = measure(args.model, args.img_size, args.batch, amp, args.steps, args.warmup, device)
        rows.append(row)
        print(
            f"D-FINE-{row['model']} {row['img_size']}px batch {row['batch']} {device.type} amp={amp} "
            f"({torch.get_num_threads()} threads): "
            f"{row['img_per_s']} img/s ({row['s_per_step']} s/step), peak memory {row['peak_memory_gb']} GiB, "
            f"loss {row['first_loss']} -> {row['last_loss']}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
