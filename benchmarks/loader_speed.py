"""Data loader alone: training samples per second with and without train.cache, with mosaic.

    python -m benchmarks.loader_speed                       # 64 demo images, 320 px, mosaic on every sample
    python -m benchmarks.loader_speed --images 200 --workers 4 --mosaic 0.5

The training split of a synthetic demo data set (made in a temporary folder) through the real DataLoader
(workers, collate, augmentations from config.yaml), no model. On a GPU the loader is what limits training:
this is the ceiling the loop can reach. Epoch 0 of each mode is a warm-up (worker start-up, disk cache writes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader


def loader_img_per_s(cfg, epochs: int) -> tuple[float, float]:
    """(seconds to build the datasets, including the cache; img/s over the epochs after the first)."""
    from src.dl.train.dataset import build_collate
    from src.dl.train.settings import DataSettings
    from src.dl.train.setup import datasets_of

    started = time.perf_counter()
    dataset = datasets_of(cfg, log=False)["train"]
    build_s = time.perf_counter() - started
    images, elapsed = 0, 0.0
    for epoch in range(epochs + 1):
        dataset.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_size=int(cfg.train.batch_size),
            shuffle=True,
            num_workers=int(cfg.train.num_workers),
            collate_fn=build_collate(DataSettings.from_config(cfg), train=True),
        )
        started = time.perf_counter()
        count = sum(len(batch[0]) for batch in loader)
        if epoch > 0:
            images, elapsed = images + count, elapsed + time.perf_counter() - started
    return build_s, images / elapsed


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks.train_speed import make_data
    from src.common.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mosaic", type=float, default=1.0, help="train.mosaic.prob")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per mode (after one warm-up)")
    parser.add_argument("--modes", nargs="+", default=["off", "ram", "disk"])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader_speed_") as tmp:
        data = make_data(Path(tmp), args.images)
        for mode in args.modes:
            cfg = load_config(
                [
                    f"data_path={data}",
                    f"model.img_size=[{args.img_size},{args.img_size}]",
                    f"train.batch_size={args.batch}",
                    f"train.num_workers={args.workers}",
                    f"train.mosaic.prob={args.mosaic}",
                    "train.mosaic.no_mosaic_epochs=0",
                    f"train.epochs={args.epochs + 1}",
                    f"train.cache={mode}",
                    f"train.cache_dir={Path(tmp) / 'cache'}",
                ]
            )
            build_s, img_per_s = loader_img_per_s(cfg, args.epochs)
            rows.append({"cache": mode, "img_per_s": img_per_s, "build_s": build_s})
            print(
                f"loader, cache={mode}: {img_per_s:.1f} img/s ({args.workers} workers, mosaic prob "
                f"{args.mosaic}, {args.img_size} px; datasets + cache built in {build_s:.1f} s)",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
