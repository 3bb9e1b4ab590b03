"""Save a trained experiment's model in its family's official checkpoint format (to fine-tune from it here
or in the official code).

    python -m src.dl.save_official exp_name=my_run

Reads output/<exp>/best.pt and writes output/<exp>/<arch>_<name>_<exp>.pth: D-FINE, DEIM and RT-DETRv2 as
their solver saves ({"model", "ema": {"module"}}), DETR as its main.py does ({"model", "epoch"}); see
src/models/official.py. Then `train.pretrained_model_path=<that file>` starts another run from it, with any
class count: the load report lists what was reused and what was re-initialised.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.common.errors import UserError
from src.common.experiment import Experiment, stage_config
from src.models.checkpoint import load_run_checkpoint
from src.models.official import official_file_name, save_official_checkpoint


def run(cfg: DictConfig) -> Path:
    cfg = stage_config(cfg)
    experiment = Experiment.of(cfg)
    best = experiment.file("best")
    if not best.exists():
        raise UserError(f"{best} not found: train exp_name={cfg.exp_name} first")
    checkpoint = load_run_checkpoint(best)
    path = experiment.root / official_file_name(checkpoint.spec, str(cfg.exp_name))
    try:
        save_official_checkpoint(path, checkpoint.spec, checkpoint.model, checkpoint.epoch)
    except ValueError as err:  # a model the official format cannot hold (a segmentation model)
        raise UserError(f"{best}: {err}") from err
    logger.info(
        f"{checkpoint.spec.display_name} (epoch {checkpoint.epoch}) saved in the official format: {path}; "
        f"fine-tune from it with train.pretrained_model_path={path}"
    )
    return path


main = stage_main(run)

if __name__ == "__main__":
    main()
