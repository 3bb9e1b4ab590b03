"""Parameters, GFLOPs and CPU eager latency of every D-FINE size (batch 1, 640x640, deployed model).

    python -m benchmarks.model_speed [--variant dfine|deim] [--img-size 640 640] [--runs 10] [--sizes n s]
                                     [--threads N]

GFLOPs are counted by torch.utils.flop_counter.FlopCounterMode (one multiply-add = 2 FLOPs; ops it does not
count, such as grid_sample and softmax, are left out). Latency is the median of `runs` timed forwards
after warm-up. On a busy machine prefer --threads 1: OpenMP threads competing with other processes for the
same cores slow down far more than one thread does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from src.models import SIZES, build_model


def count_gflops(model: torch.nn.Module, images: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(images)
    return counter.get_total_flops() / 1e9


def median_latency_ms(model: torch.nn.Module, images: torch.Tensor, runs: int, warmup: int = 3) -> float:
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(images)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(size: str, variant: str, img_size: tuple[int, int], runs: int) -> dict:
    torch.manual_seed(0)
    model = build_model(size, 80, img_size=img_size, variant=variant)
    params = sum(p.numel() for p in model.parameters())
    model.deploy()
    images = torch.rand(1, 3, *img_size)
    return {
        "size": size,
        "params_m": params / 1e6,
        "deployed_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": count_gflops(model, images),
        "latency_ms": median_latency_ms(model, images, runs),
    }


def format_table(rows: list[dict], variant: str, img_size: tuple[int, int], runs: int) -> str:
    header = (
        f"D-FINE ({variant}) @ {img_size[0]}x{img_size[1]}, batch 1, CPU eager, {torch.get_num_threads()} threads, "
        f"median of {runs}\n"
        "| size | params (M) | deployed params (M) | GFLOPs | CPU latency (ms) |\n"
        "|------|-----------:|--------------------:|-------:|-----------------:|"
    )
    lines = [
        f"| {r['size']} | {r['params_m']:.2f} | {r['deployed_params_m']:.2f} | {r['gflops']:.1f} | {r['latency_ms']:.0f} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="dfine", choices=["dfine", "deim"])
    parser.add_argument("--img-size", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    img_size = (args.img_size[0], args.img_size[1])
    rows = [measure(size, args.variant, img_size, args.runs) for size in args.sizes]
    table = format_table(rows, args.variant, img_size, args.runs)
    print(table)
    return table


if __name__ == "__main__":
    main()
