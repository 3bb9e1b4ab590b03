"""Segmentation vs detection training step at the same size (target: step time and peak memory
each <= 1.3x the detector's).

    python -m benchmarks.seg_step [--size n] [--img 256] [--batch 4] [--steps 5] [--device cpu]

The bare step: model forward (train mode, denoising on), criterion, backward, AdamW, on synthetic images
with 3 filled polygons each (masks for the segmentation run). Each task runs in its own process so its
peak memory is its own: peak GPU memory on CUDA; on CPU the growth of the process's peak resident memory
over what it held before the first step (model, optimizer and batch already built), which the allocator
makes noisy, so also the bytes of the tensors autograd saves for backward in one step (deterministic: the
activation memory training adds per step; tensors are counted each time autograd saves them). Step time:
the fastest of `steps` (the least disturbed by other processes on a shared machine). GFLOPs: one eval
forward of the deployed model at the same size, batch 1 (torch's FlopCounterMode; the machine-independent
cost).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import cv2
import numpy as np
import torch

NUM_CLASSES = 4


def polygon_batch(batch: int, img: int, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    rng = np.random.default_rng(0)
    images, targets = torch.rand(batch, 3, img, img, generator=torch.Generator().manual_seed(0)), []
    for _ in range(batch):
        masks, boxes = [], []
        for _ in range(3):
            centre = rng.uniform(0.25, 0.75, 2) * img
            angles = np.sort(rng.uniform(0, 2 * np.pi, 8))
            radii = rng.uniform(0.05, 0.2, 8) * img
            points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
            mask = np.zeros((img, img), np.uint8)
            cv2.fillPoly(mask, [points.round().astype(np.int32)], 1)
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            boxes.append([(x0 + x1) / 2 / img, (y0 + y1) / 2 / img, (x1 - x0) / img, (y1 - y0) / img])
            masks.append(mask.astype(bool))
        targets.append(
            {
                "labels": torch.from_numpy(rng.integers(0, NUM_CLASSES, 3)).to(device),
                "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                "masks": torch.from_numpy(np.stack(masks)).to(device),
            }
        )
    return images.to(device), targets


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(float(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


def measure(task: str, size: str, img: int, batch: int, steps: int, device: str) -> dict:
    """One task's mean step time (after one warm-up step) and peak memory, in this process."""
    from src.common.config import load_config
    from src.models import build_criterion, build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(size, NUM_CLASSES, img_size=(img, img), task=task).to(dev).train()
    mask_loss = dict(load_config().train.mask_loss) if task == "segment" else None
    criterion = build_criterion(size, NUM_CLASSES, mask_loss=mask_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = polygon_batch(batch, img, dev)

    def step() -> None:
        loss = sum(criterion(model(images, targets), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()  # also the warm-up (optimizer state, allocator)
    before = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {
        "task": task,
        "step_s": min(times),
        "peak_mb": peak,
        "saved_mb": sum(saved) / 2**20,
        "gflops": forward_gflops(size, img, task),
    }


def forward_gflops(size: str, img: int, task: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from src.models import build_model

    model = build_model(size, NUM_CLASSES, img_size=(img, img), task=task).deploy()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 3, img, img))
    return counter.get_total_flops() / 1e9


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="n")
    parser.add_argument("--img", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # the child process: one task, JSON out
    args = parser.parse_args(argv)
    if args.task:
        print(json.dumps(measure(args.task, args.size, args.img, args.batch, args.steps, args.device)))
        return
    results = {}
    for task in ("detect", "segment"):
        child = [sys.executable, "-m", "benchmarks.seg_step", *argv, "--task", task]
        results[task] = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    print(
        f"D-FINE-{args.size}, {args.img} px, batch {args.batch}, {args.device}, fastest of {args.steps} steps"
    )
    for task, row in results.items():
        print(
            f"  {task:8s} step {row['step_s']:.3f} s   peak memory {row['peak_mb']:.0f} MB   "
            f"saved for backward {row['saved_mb']:.0f} MB   forward {row['gflops']:.2f} GFLOPs"
        )
    detect, segment = results["detect"], results["segment"]
    print(
        f"  segment / detect: step {segment['step_s'] / detect['step_s']:.2f}x, "
        f"peak memory {segment['peak_mb'] / max(detect['peak_mb'], 1e-9):.2f}x, "
        f"saved for backward {segment['saved_mb'] / detect['saved_mb']:.2f}x, "
        f"forward GFLOPs {segment['gflops'] / detect['gflops']:.2f}x"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
