"""One training step of an official DEIM-repo model (RT-DETRv2, DEIM-RT-DETRv2, D-FINE, DEIM-D-FINE) and ours.

    official-venv/bin/python tools/parity/rtdetrv2/time_step.py --official /path/to/DEIM --arch rtdetrv2 --threads 1

A step = forward + criterion + backward + grad-norm clip (0.1, the configs' clip_max_norm) + AdamW step,
batch 8 at 320x320 in train mode with denoising on, fp32 and bf16 autocast on the CPU. Each side runs its
own training loop's step: the official det_engine's (criterion on the raw outputs, autocast disabled) and
ours (src.dl.train.core.compute_loss's: outputs cast to float32 before the criterion). Both models run in
the same process and torch, on the same images and targets, and alternate step by step so that both see
the same machine load. The smallest size of each family: r18 for the RT-DETRv2 archs, n for D-FINE's.
Prints one JSON report: median wall and process-CPU seconds (user + sys) per side and precision, the
ratios ours / official, every repetition, the CPU and its bf16 support, threads, load average before and
after. Build one arch per process: the official config loader keeps the keys of earlier files.
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

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import CONFIGS, Official  # noqa: E402

BATCH, SIZE, BOXES_PER_IMAGE = 8, 320, 6
# arch -> (our size name, official config path under configs/, the backbone whose ImageNet download is off)
SMALLEST = {
    "rtdetrv2": ("r18", f"deim_rtdetrv2/{CONFIGS['rtdetrv2']['r18']}.yml", "PResNet"),
    "deim_rtdetrv2": ("r18", f"deim_rtdetrv2/{CONFIGS['deim_rtdetrv2']['r18']}.yml", "PResNet"),
    "dfine": ("n", "deim_dfine/dfine_hgnetv2_n_coco.yml", "HGNetv2"),
    "deim_dfine": ("n", "deim_dfine/deim_hgnetv2_n_coco.yml", "HGNetv2"),
}


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
    _, config, backbone = SMALLEST[arch]
    cfg = official.yaml_config(str(official.root / "configs" / config), **{backbone: {"pretrained": False}})
    return cfg.model, cfg.criterion


def our_detector(arch: str):
    from src.models import ModelSpec, build

    size = SMALLEST[arch][0]
    spec = ModelSpec(arch=arch, size=size, img_size=(640, 640), data_class_names=tuple(map(str, range(80))))
    detector = build(spec)
    return detector.model, detector.criterion


def official_loss(model, criterion, images, targets, bf16: bool) -> torch.Tensor:
    """det_engine.train_one_epoch: forward under autocast, the criterion with autocast disabled."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        outputs = model(images, targets=targets)
    with torch.autocast("cpu", enabled=False):
        losses = criterion(outputs, targets)
    return sum(losses.values())


def to_float32(outputs):
    """Floating tensors of nested dicts/lists as float32 (our loop's cast before the criterion)."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(value) for value in outputs)
    return outputs


def our_loss(model, criterion, images, targets, bf16: bool) -> torch.Tensor:
    """src.dl.train.core.compute_loss (not imported: the training package needs the product's config stack,
    which the official venv lacks): forward under autocast, the criterion on float32 outputs."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        outputs = model(images, targets)
    return sum(criterion(to_float32(outputs), targets).values())


class Stepper:
    """One model, its criterion, its loop's loss and AdamW; `step(bf16)` runs one timed training step."""

    def __init__(self, model: torch.nn.Module, criterion: torch.nn.Module, loss_fn, images, targets):
        self.model, self.criterion, self.loss_fn = model.train(), criterion, loss_fn
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        self.images, self.targets = images, targets

    def step(self, bf16: bool) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process: user + sys) of one training step."""
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.loss_fn(self.model, self.criterion, self.images, self.targets, bf16)
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
    return f"{name}; bf16 flags: {', '.join(bf16) or 'none'}; {os.cpu_count()} CPUs"


def interleaved(steppers: dict[str, Stepper], bf16: bool, warmup: int, repeats: int) -> dict[str, list]:
    """Per side the (wall, CPU) seconds of each timed step; the sides alternate step by step."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    for i in range(warmup + repeats):
        for name, stepper in steppers.items():
            seconds = stepper.step(bf16)
            if i >= warmup:
                times[name].append(seconds)
    return times


def summary(times: dict[str, list[tuple[float, float]]]) -> dict:
    wall = {name: statistics.median(w for w, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    return {
        "median_wall_s": wall,
        "median_cpu_s": cpu,
        "ratio_wall": wall["ours"] / wall["official"],
        "ratio_cpu": cpu["ours"] / cpu["official"],
        "all_wall_s": {name: [w for w, _ in values] for name, values in times.items()},
        "all_cpu_s": {name: [c for _, c in values] for name, values in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of Intellindust-AI-Lab/DEIM")
    parser.add_argument("--arch", choices=sorted(SMALLEST), default="rtdetrv2")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), action="append", help="default: both")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    official = Official(args.official)
    images, targets = batch()
    torch.manual_seed(0)
    steppers = {
        "official": Stepper(*official_detector(official, args.arch), official_loss, images, targets),
        "ours": Stepper(*our_detector(args.arch), our_loss, images, targets),
    }
    report = {
        "setting": f"{args.arch} {SMALLEST[args.arch][0]}, batch {BATCH}, {SIZE}x{SIZE}, "
        f"median of {args.repeats} after {args.warmup} warm-up",
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_before": os.getloadavg(),
    }
    for precision in args.precision or ["fp32", "bf16"]:
        report[precision] = summary(interleaved(steppers, precision == "bf16", args.warmup, args.repeats))
        print(
            f"{precision}: {json.dumps({k: report[precision][k] for k in ('median_cpu_s', 'ratio_cpu')})}",
            file=sys.stderr,
            flush=True,
        )
    report["loadavg_after"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
