"""One training step of the official RT-DETRv2 / DEIM-RT-DETRv2 and of ours, side by side.

    official-venv/bin/python tools/parity/rtdetrv2/time_step.py --official /path/to/DEIM [--arch rtdetrv2]

A step = forward + criterion + backward + grad-norm clip (0.1, the configs' clip_max_norm) + AdamW step,
batch 8 at 320x320 in train mode with denoising on, fp32 and bf16 autocast on the CPU, as the official
det_engine runs it (the criterion outside autocast). Both models run in the same process and torch, on
the same images and targets; their steps alternate so that both see the same machine load. Prints the
median wall and CPU (process) seconds of the timed repetitions, the ratios ours / official, the CPU and
its bf16 support, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import CONFIGS, Official  # noqa: E402

BATCH, SIZE, BOXES_PER_IMAGE = 8, 320, 6


def batch(seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=generator)
    targets = []
    for _ in range(BATCH):
        centres = 0.2 + 0.6 * torch.rand(BOXES_PER_IMAGE, 2, generator=generator)
        sizes = 0.05 + 0.3 * torch.rand(BOXES_PER_IMAGE, 2, generator=generator)
        labels = torch.randint(0, 80, (BOXES_PER_IMAGE,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], dim=1)})
    return images, targets


def official_detector(official: Official, arch: str):
    model, criterion, _ = official.build(CONFIGS[arch]["r18"])
    return model, criterion


def our_detector(arch: str):
    from src.models import ModelSpec, build

    spec = ModelSpec(arch=arch, size="r18", img_size=(640, 640), data_class_names=tuple(map(str, range(80))))
    detector = build(spec)
    return detector.model, detector.criterion


class Stepper:
    """One model, its criterion and AdamW; `step(bf16)` runs one timed training step."""

    def __init__(self, model: torch.nn.Module, criterion: torch.nn.Module, images, targets):
        self.model, self.criterion = model.train(), criterion
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        self.images, self.targets = images, targets

    def step(self, bf16: bool) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one training step."""
        start, cpu_start = time.perf_counter(), time.process_time()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with autocast:
            outputs = self.model(self.images, targets=self.targets)
        losses = self.criterion(outputs, self.targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.1)
        self.optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu_start


def cpu_description() -> str:
    name, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    return f"{name}; bf16 flags: {', '.join(bf16) or 'none'}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


def compare(
    steppers: dict[str, Stepper], bf16: bool, warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Per model the medians of (wall, CPU) seconds over the timed steps; the models alternate."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    for i in range(warmup + repeats):
        for name, stepper in steppers.items():
            seconds = stepper.step(bf16)
            if i >= warmup:
                times[name].append(seconds)
    return {
        name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
        for name, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of Intellindust-AI-Lab/DEIM")
    parser.add_argument("--arch", choices=sorted(CONFIGS), default="rtdetrv2")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), action="append", help="default: both")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    official = Official(args.official)
    images, targets = batch()
    torch.manual_seed(0)
    steppers = {
        "official": Stepper(*official_detector(official, args.arch), images, targets),
        "ours": Stepper(*our_detector(args.arch), images, targets),
    }
    print(f"CPU: {cpu_description()}")
    print(f"load average before: {os.getloadavg()}")
    print(
        f"{args.arch} r18, batch {BATCH}, {SIZE}x{SIZE}, median of {args.repeats} after {args.warmup} warm-up"
    )
    for precision in args.precision or ["fp32", "bf16"]:
        medians = compare(steppers, precision == "bf16", args.warmup, args.repeats)
        (wall_official, cpu_official), (wall_ours, cpu_ours) = medians["official"], medians["ours"]
        print(
            f"{precision}: wall official {wall_official:.3f} s, ours {wall_ours:.3f} s, "
            f"ours/official {wall_ours / wall_official:.3f} | CPU official {cpu_official:.3f} s, "
            f"ours {cpu_ours:.3f} s, ours/official {cpu_ours / cpu_official:.3f}",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
