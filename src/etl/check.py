"""Dataset doctor stage: find everything wrong with `<data_path>/images` + `<data_path>/labels` before training does.

    python -m src.etl.check                      # report; stop on fatal problems
    python -m src.etl.check check.skip_bad=true  # report; leave bad images out (split/train then use the rest)

What is fatal and what is a warning: src/etl/doctor.py (the library split, tile and training call too).
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from omegaconf import DictConfig

from src.common.config import stage_main
from src.etl.doctor import Report, check_dataset


def run(cfg: DictConfig) -> Report:
    report = check_dataset(cfg)
    logger.info(f"report written to {Path(cfg.check.report_dir) / 'report.json'} and report.csv")
    return report


main = stage_main(run)

if __name__ == "__main__":
    main()
