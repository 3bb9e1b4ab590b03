"""One DETR-R50 training step, the official code's and ours, side by side in one process and one torch.

    official-venv/bin/python tools/parity/detr/time_step.py --official /path/to/detr

A step is forward + loss + backward + gradient clipping (0.1) + AdamW (lr 1e-4, backbone 1e-5, weight
decay 1e-4: the official recipe), batch 8 at 320x320, fp32 and bf16 autocast. Both models hold the same
weights (ours loads the official state dict), see the same images and targets, and alternate step by step
so they share the machine's load. bf16: the forward runs under autocast and its outputs are cast to
float32 before the loss, as our training loop does (the official code has no mixed precision of its own;
its matcher cannot take bf16 costs). The official model gets ImageNet-normalised input (its data pipeline
normalises); ours normalises inside the step. Prints one JSON report (median of the timed repetitions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures  # noqa: E402

REPO_ROOT = make_fixtures.REPO_ROOT


def to_float32(outputs):
    if torch.is_tensor(outputs):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [to_float32(v) for v in outputs]
    return outputs


def batch(size: int, image_size: int, seed: int = 0):
    """Images in [0, 1] (B, 3, S, S) and three random objects per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, image_size, image_size, generator=generator)
    targets = []
    for _ in range(size):
        centres = 0.2 + 0.6 * torch.rand(3, 2, generator=generator)
        sizes = 0.05 + 0.25 * torch.rand(3, 2, generator=generator)
        labels = torch.randint(0, make_fixtures.NUM_CLASSES, (3,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], 1)})
    return images, targets


def official_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """main.py's parameter groups: backbone at lr_backbone, the rest at lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if "backbone" not in n]},
        {"params": [p for n, p in named if "backbone" in n], "lr": 1e-5},
    ]
    return torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)


class Runner:
    """One implementation's step: model, loss (returns the training loss), optimizer."""

    def __init__(self, model, loss_fn, model_input):
        self.model, self.loss_fn, self.model_input = model.train(), loss_fn, model_input
        self.optimizer = official_optimizer(model)

    def step(self, images, targets, amp: bool) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one training step."""
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outputs = self.model(self.model_input(images))
        loss = self.loss_fn(to_float32(outputs), targets)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.1)
        self.optimizer.step()
        return time.perf_counter() - start, time.process_time() - start_cpu


def official_runner(official: Path) -> Runner:
    modules = make_fixtures.import_official(official)
    model, criterion, _, _ = make_fixtures.build_official(modules, "r50", dropout=0.1)
    mean = torch.tensor(make_fixtures.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(make_fixtures.IMAGENET_STD)[:, None, None]

    def loss(outputs, targets):
        terms = criterion(outputs, targets)
        return sum(terms[k] * criterion.weight_dict[k] for k in terms if k in criterion.weight_dict)

    return Runner(model, loss, lambda images: make_fixtures.nested((images - mean) / std))


def our_runner(official_model: torch.nn.Module) -> Runner:
    from src.models.detr.criterion import build_criterion
    from src.models.detr.model import build_model

    model = build_model("r50", make_fixtures.NUM_CLASSES)
    model.load_state_dict(official_model.state_dict())
    criterion = build_criterion(make_fixtures.NUM_CLASSES)
    return Runner(model, lambda outputs, targets: sum(criterion(outputs, targets).values()), lambda x: x)


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {key: statistics.median(values) for key, values in times.items()}


def ratios(median: dict[str, float], precisions: list[str]) -> dict[str, float]:
    return {
        f"ours/official_{p}": median[f"ours_{p}"] / median[f"official_{p}"]
        for p in precisions
        if f"ours_{p}" in median and f"official_{p}" in median
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--reps", type=int, default=5, help="timed steps per implementation and precision")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--only", choices=["official", "ours"], help="time one implementation")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    official = official_runner(args.official.resolve())
    runners = {"official": official, "ours": our_runner(official.model)}
    if args.only:
        runners = {args.only: runners[args.only]}
    images, targets = batch(args.batch, args.image_size)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {}
    cpu_times: dict[str, list[float]] = {}
    for precision in args.precisions:
        for rep in range(args.warmup + args.reps):
            for name, runner in runners.items():
                wall, cpu = runner.step(images, targets, amp=precision == "bf16")
                if rep >= args.warmup:
                    times.setdefault(f"{name}_{precision}", []).append(wall)
                    cpu_times.setdefault(f"{name}_{precision}", []).append(cpu)
    report = {
        "setting": f"DETR-R50 train step, batch {args.batch}, {args.image_size}x{args.image_size}",
        "median_s": medians(times),
        "ratio": ratios(medians(times), args.precisions),
        # CPU seconds of the process: less sensitive than wall time to other jobs on a shared machine
        "median_cpu_s": medians(cpu_times),
        "cpu_ratio": ratios(medians(cpu_times), args.precisions),
        "all_s": times,
        "all_cpu_s": cpu_times,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
