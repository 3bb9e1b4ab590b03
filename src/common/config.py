"""One Hydra config for every stage: entry helper, experiment folder, and the run's saved config.

Every stage module has `run(cfg)` (called by tests) and `main = stage_main(run)` (the CLI):
    python -m src.etl.split split.val=0.2
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where config.yaml lives
CONFIG_NAME = "config"

# Keys that define the trained model. Train saves them; every later stage given exp_name re-reads them,
# so a user never repeats train-time overrides.
MODEL_KEYS = ("model", "label_to_name")


def load_config(overrides: Sequence[str] = (), config_dir: Path | None = None) -> DictConfig:
    """Compose config.yaml with command-line style overrides (what tests and notebooks use)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or ROOT), version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


def stage_main(run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """Wrap a stage's `run(cfg)` as a Hydra CLI entry point reading config.yaml at the repo root."""
    import hydra

    @hydra.main(config_path=str(ROOT), config_name=CONFIG_NAME, version_base=None)
    @functools.wraps(run)
    def _main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except UserError as err:  # a refusal the user fixes: one line, no traceback
            logger.error(str(err))
            sys.exit(2)

    return _main


def default_config() -> DictConfig:
    """config.yaml as written (every default), without Hydra's own keys; interpolations kept."""
    cfg = OmegaConf.load(ROOT / f"{CONFIG_NAME}.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    return cfg


def exp_dir(cfg: DictConfig) -> Path:
    """output_dir/exp_name, exp_name checked to be a plain folder name (src.common.experiment owns it)."""
    from src.common.experiment import Experiment

    return Experiment.of(cfg).root


def saved_config_path(cfg: DictConfig) -> Path:
    return exp_dir(cfg) / "config.yaml"


def save_run_config(cfg: DictConfig, path: Path | None = None) -> Path:
    """Write the resolved config into the experiment folder (atomically)."""
    from src.common.io import atomic_write_text

    path = path or saved_config_path(cfg)
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def with_saved_model_keys(cfg: DictConfig) -> DictConfig:
    """Return cfg with the model-defining keys taken from the experiment's saved config, if there is one.

    A differing value given now is overridden by the trained one, with a warning: the weights fix it.
    """
    saved_path = saved_config_path(cfg)
    if not saved_path.exists():
        return cfg
    saved = OmegaConf.load(saved_path)
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)
    for key in MODEL_KEYS:
        if key not in saved:
            continue
        now, then = OmegaConf.to_container(cfg.get(key)), OmegaConf.to_container(saved[key])
        if now != then:
            logger.warning(
                f"{key}: using the trained experiment's value from {saved_path} ({then}), not {now}"
            )
        merged[key] = saved[key]
    return merged


def label_names(cfg: DictConfig) -> list[str]:
    """Class names ordered by id; ids must be 0..N-1."""
    mapping = {int(k): str(v) for k, v in cfg.label_to_name.items()}
    if sorted(mapping) != list(range(len(mapping))):
        raise ValueError(
            f"label_to_name ids must be 0..{len(mapping) - 1} without gaps, got {sorted(mapping)}"
        )
    return [mapping[i] for i in range(len(mapping))]
