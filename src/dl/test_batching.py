"""Latency and throughput per batch size for one model on one device, to pick a serving batch size.

    python -m src.dl.test_batching exp_name=my_run [test_batching.model_path=output/my_run/model.onnx]

Each batch size gets warm-up runs, then timed runs (resize + inference + postprocessing of a batch of
network-size images). Growing stops cleanly at the first out-of-memory. A fixed-batch artifact can only run
its own batch size: export with export.dynamic_batch=true (torch checkpoints are always dynamic).
Writes output/<exp>/test_batching.csv and test_batching.png.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.experiment import Experiment, stage_config
from src.common.io import atomic_write, atomic_write_csv
from src.dl.artifacts import load_experiment_model
from src.runtime.detector import Detector

OOM_MARKERS = ("out of memory", "failed to allocate", "bad_alloc", "cannot allocate", "outofmemory")


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or any(m in str(err).lower() for m in OOM_MARKERS)


def free_memory() -> None:

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_batch(detector: Detector, batch_size: int, warmup: int, runs: int) -> list[float]:
    """Wall times in ms of `runs` calls on `batch_size` images, after `warmup` untimed calls."""
    h, w = detector.img_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(batch_size)]
    for _ in range(warmup):
        detector.predict(images, batch_size=batch_size)
    return [detector.timed(images, batch_size=batch_size)[1] for _ in range(runs)]


def batch_sizes_for(detector: Detector, wanted: list[int]) -> list[int]:
    fixed = detector.runner.batch_size
    if fixed is None:
        return sorted({int(b) for b in wanted if int(b) >= 1})
    logger.warning(
        f"{detector.path} has a fixed batch of {fixed}: only that size is measured "
        "(export with export.dynamic_batch=true to compare batch sizes)"
    )
    return [fixed]


def measure(detector: Detector, batch_sizes: list[int], warmup: int, runs: int) -> pd.DataFrame:
    rows = []
    for batch_size in batch_sizes:
        try:
            times = np.asarray(time_batch(detector, batch_size, warmup, runs))
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            logger.warning(
                f"batch {batch_size}: out of memory; stopping here ({str(err).splitlines()[0][:200]})"
            )
            rows.append({"batch_size": batch_size, "status": "out of memory"})
            free_memory()
            break
        median = float(np.median(times))
        rows.append({
            "batch_size": batch_size,
            "latency_ms_median": median,
            "latency_ms_p90": float(np.percentile(times, 90)),
            "ms_per_image": median / batch_size,
            "throughput_img_s": 1000.0 * batch_size / median,
            "status": "ok",
        })  # fmt: skip
        logger.info(f"batch {batch_size:>4}: {median:8.2f} ms, {1000.0 * batch_size / median:8.1f} img/s")
        # Stop growing once the time budget of one timed run is exceeded: bigger batches only take longer.
        if median / 1000.0 * (warmup + runs) > 120:
            logger.info("stopping: the next batch size would take minutes")
            break
    return pd.DataFrame(rows)


def plot(frame: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[frame["status"] == "ok"]
    figure, left = plt.subplots(figsize=(7, 4))
    left.plot(ok["batch_size"], ok["throughput_img_s"], "o-", color="tab:blue")
    left.set_xlabel("batch size")
    left.set_ylabel("throughput (img/s)", color="tab:blue")
    left.set_xscale("log", base=2)
    right = left.twinx()
    right.plot(ok["batch_size"], ok["latency_ms_median"], "s--", color="tab:red")
    right.set_ylabel("batch latency, median (ms)", color="tab:red")
    left.set_title(title)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
    return path


def run(cfg: DictConfig) -> pd.DataFrame:
    cfg = stage_config(cfg)
    options = cfg.test_batching
    detector = load_experiment_model(cfg, options.model_path, options.precision)
    sizes = batch_sizes_for(detector, list(options.batch_sizes))
    started = time.perf_counter()
    frame = measure(detector, sizes, int(options.warmup), int(options.runs))
    frame.insert(0, "backend", detector.backend)
    frame.insert(1, "device", str(detector.runner.device))
    frame.insert(2, "infer_precision", detector.runner.precision)
    out = Experiment.of(cfg).file("test_batching")
    atomic_write_csv(out, frame)
    if (frame["status"] == "ok").any():
        plot(frame, out.with_suffix(".png"), f"{detector.backend} on {detector.runner.device}")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    logger.info(f"test_batching: {len(frame)} sizes in {time.perf_counter() - started:.0f} s -> {out}")
    return frame


main = stage_main(run)

if __name__ == "__main__":
    main()
