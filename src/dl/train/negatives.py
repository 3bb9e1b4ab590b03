"""The negatives stage: false-positive metrics of a trained experiment's best artifact on held-out
background-only images (src/dl/train/false_positives.py computes them).

    python -m src.dl.train.negatives exp_name=...      # -> output/<exp>/negatives_metrics.json
"""

from __future__ import annotations

from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.experiment import Experiment, stage_config
from src.common.io import atomic_write_json
from src.dl.artifacts import load_experiment_model
from src.dl.train.false_positives import check_negatives_disjoint, describe, evaluate_negatives
from src.dl.train.settings import measured_thresholds
from src.dl.train.setup import split_image_paths


def run(cfg: DictConfig) -> dict[str, float]:
    """The experiment's best artifact on train.negatives_path -> output/<exp>/negatives_metrics.json."""
    cfg = stage_config(cfg)  # data, classes and model settings of the trained experiment
    negatives = check_negatives_disjoint(
        cfg.train.negatives_path, split_image_paths(cfg), workers=int(cfg.check.workers), missing_ok=False
    )
    if not negatives:
        raise ValueError(f"no images in the negatives folder {cfg.train.negatives_path}")
    detector = load_experiment_model(cfg)
    metrics = evaluate_negatives(
        detector, negatives, measured_thresholds(cfg.train.negatives_thresholds, cfg.train.conf_thresh)
    )
    path = atomic_write_json(
        Experiment.of(cfg).file("negatives_metrics"), metrics | {"model": str(detector.path)}
    )
    logger.info(f"negatives ({len(negatives)} images): {describe(metrics)} -> {path}")
    return metrics


main = stage_main(run)

if __name__ == "__main__":
    main()
