"""Validation cost during training: the share of an epoch spent validating (val split + negatives folder).

    python -m benchmarks.val_cost                              # the demo data set, config.yaml's training defaults
    python -m benchmarks.val_cost --set train.eval_every=1 train.negatives_max_images=null   # other settings

On a synthetic demo data set (make_demo_data's defaults: 240 images, 40 negatives; made in a temporary
folder) a real Trainer times its pieces: one whole training epoch after a one-batch warm-up (or --train-steps
batches of it, scaled to the epoch), the val pass, the negatives pass over the training-time
subset and over the whole folder (median of --repeats each). The share per epoch over a whole run follows
from these and the epochs validate() runs (train.eval_every, the tail):
    before  validation of every epoch with every negative (the behaviour before train.eval_every)
    now     the given settings (config.yaml's defaults unless --set)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_demo(root: Path) -> Path:
    """The demo data set (with its negatives folder, without videos), split."""
    from src.common.config import load_config
    from src.etl import make_demo_data, split

    data = root / "data"
    make_demo_data.run(load_config([f"data_path={data}", "demo_data.num_videos=0"]))
    split.run(load_config([f"data_path={data}", f"check.report_dir={root / 'report'}"]))
    return data


def timed(work, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(cfg, train_steps: int | None, repeats: int) -> dict:
    """Seconds: one training epoch (scaled from train_steps batches if given), the val pass, the negatives
    passes."""
    from src.dl.train import build_trainer
    from src.dl.train.distributed import setup_distributed

    trainer = build_trainer(cfg, setup_distributed(str(cfg.device)))
    trainer.exp.root.mkdir(parents=True, exist_ok=True)
    full_batches = trainer.batches_in_epoch(0)
    trainer.train_batches(0, n_batches=1)  # warm-up: first-call costs, not an epoch's
    steps = min(train_steps or full_batches, full_batches)
    trainer.state.batch = 0
    train_s = timed(lambda: trainer.train_batches(1, n_batches=steps), 1) * full_batches / steps
    model, evaluator = trainer.eval_model(), trainer.evaluator
    return {
        "train_epoch_s": train_s,
        "val_s": timed(lambda: evaluator.evaluate_split(model, "val", plots=False), repeats),
        "negatives_subset_s": timed(lambda: evaluator.negatives_metrics(model, subsample=True), repeats),
        "negatives_all_s": timed(lambda: evaluator.negatives_metrics(model), repeats),
        "validated_epochs": [e + 1 for e in range(int(cfg.train.epochs)) if evaluator.validates(e)],
        "negatives": len(trainer.data.negatives),
    }


def shares(times: dict, epochs: int) -> dict:
    """Validation seconds per training second, averaged over the run: before and with the settings."""
    before = (times["val_s"] + times["negatives_all_s"]) / times["train_epoch_s"]
    per_validation = times["val_s"] + times["negatives_subset_s"]
    now = len(times["validated_epochs"]) * per_validation / (epochs * times["train_epoch_s"])
    return {"share_before": before, "share_now": now}


def main(argv: list[str] | None = None) -> dict:
    from src.common.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (key=value) for 'now'")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training batches (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each validation part")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="val_cost_") as tmp:
        root = Path(tmp)
        data = make_demo(root)
        overrides = [
            f"data_path={data}", f"output_dir={root / 'output'}", "exp_name=val_cost",
            f"check.report_dir={root / 'report'}", "train.checkpoint_every_minutes=0", *args.set,
        ]  # fmt: skip
        cfg = load_config(overrides)
        times = measure(cfg, args.train_steps, args.repeats)
    result = times | shares(times, int(cfg.train.epochs))
    print(
        f"{torch.get_num_threads()} torch thread(s); one training epoch {times['train_epoch_s']:.1f} s; val "
        f"{times['val_s']:.2f} s; negatives {times['negatives_subset_s']:.2f} s (training subset) / "
        f"{times['negatives_all_s']:.2f} s (all {times['negatives']}); validated epochs "
        f"{times['validated_epochs']} of {cfg.train.epochs}",
        flush=True,
    )
    print(
        f"validation share of an epoch: before {result['share_before']:.1%} (every epoch, every negative), "
        f"now {result['share_now']:.1%} (eval_every={cfg.train.eval_every}, "
        f"negatives_max_images={cfg.train.negatives_max_images})",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
