"""A training run's parts, built from the config: the half of the training stage that reads it (run.py is
the other). Every check on config and data runs here; nothing is written.

    trainer = build_trainer(cfg, ctx)                  # doctor, datasets, negatives, model, optimizer
    trainer = build_trainer(cfg, ctx, resumed=last)    # the same, then last.pt loaded into every part

The parts below the stage (trainer, epoch, evaluation, loggers, optim, negatives...) get plain values and
objects from here, never the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src.common.errors import UserError
from src.common.experiment import Experiment
from src.common.hardware import Precision, apply_channels_last
from src.dl.train.dataset import DetectionDataset, build_collate, build_datasets
from src.dl.train.distributed import DistContext, on_main
from src.dl.train.ema import ModelEMA
from src.dl.train.epoch import Optimization
from src.dl.train.evaluation import check_decision_metrics
from src.dl.train.events import Events
from src.dl.train.false_positives import check_negatives_disjoint
from src.dl.train.optim import backbone_parameters, build_lr_scheduler, build_optimizer
from src.dl.train.profile import NO_TIMER, SectionTimer, time_calls
from src.dl.train.rng import seed_everything
from src.dl.train.settings import DataSettings, EvalSettings, TrainSettings
from src.dl.train.speed import setup_speed
from src.dl.train.trainer import ModelParts, TrainData, Trainer, batches_in_epoch
from src.etl.doctor import check_dataset
from src.etl.splits import read_split, split_csv_path
from src.models import checkpoint_arch_overrides, load_pretrained
from src.models.build import build, check_buildable
from src.models.checkpoint import RunCheckpoint
from src.models.denoising import set_denoising_negatives, set_denoising_queries
from src.models.spec import ModelSpec


def build_trainer(
    cfg: DictConfig,
    ctx: DistContext,
    resumed: RunCheckpoint | None = None,
    events: Events | None = None,
    timer=NO_TIMER,
) -> Trainer:
    """The Trainer of this config (resumed: last.pt of the run to continue). events: the table loggers are
    added to later (a new one if None); timer: a profile.SectionTimer for benchmarks.train_speed --profile."""
    settings = TrainSettings.from_config(cfg)
    spec = ModelSpec.from_config(cfg)  # the architecture a checkpoint fixes follows below
    check_buildable(spec)  # before the dataset doctor's minutes: the task and size fit the family
    check_decision_metrics(list(settings.evaluation.decision_metrics), spec.task)  # mask mAP: segment only
    precision, tuner = setup_speed(
        settings.threads, settings.num_workers, settings.amp, ctx.device, ctx.world_size
    )
    seed_everything(settings.seed + ctx.rank, settings.deterministic)
    data = build_data(cfg, ctx, settings.evaluation)
    spec = spec.with_arch_overrides(arch_overrides(settings, ctx, resumed))
    parts = build_model_parts(spec, settings, ctx, precision)
    matcher = getattr(parts.criterion, "matcher", None)  # every family's criterion matches with one
    if isinstance(timer, SectionTimer) and isinstance(matcher, nn.Module):
        time_calls(matcher, timer, "matcher")
    steps = steps_per_epoch(data.datasets["train"], settings, ctx)
    optimization = build_optimization(parts.model, settings, steps, precision, log=ctx.is_main)
    trainer = Trainer(
        settings, ctx, Experiment.of(cfg), spec, data, parts, optimization, precision, events or Events(),
        OmegaConf.to_container(cfg, resolve=True), tuner, timer,
    )  # fmt: skip
    if resumed is not None:
        trainer.resume_from(resumed.training, resumed.model)
    if ctx.is_main:
        log_setup(trainer)
    return trainer


# ---------------------------------------------------------------------------------------------- data


def split_image_paths(cfg: DictConfig) -> list[Path]:
    """Every image the split CSVs list (train, val, test; excluded ones too): what negatives must avoid."""
    return [path for split in ("train", "val", "test") for path in read_split(cfg, split) or []]


def split_paths(cfg: DictConfig, split: str, exclude: Iterable[str] = ()) -> list[Path]:
    """The images <splits_dir>/<split>.csv lists, less `exclude` (names as the dataset doctor reports them)."""
    paths = read_split(cfg, split, exclude)
    if paths is None:
        raise FileNotFoundError(f"{split_csv_path(cfg, split)} not found: run `make split` first")
    return paths


def split_dataset(cfg: DictConfig, split: str, train: bool | None = None) -> DetectionDataset:
    """One split's dataset as the config describes it (train: augment; default split == "train")."""
    return DetectionDataset(DataSettings.from_config(cfg), split, split_paths(cfg, split), train)


def datasets_of(
    cfg: DictConfig, exclude: Iterable[str] = (), log: bool = True
) -> dict[str, DetectionDataset]:
    """{"train", "val"[, "test"]}: the datasets of the config's splits (test when test.csv lists images)."""
    paths = {split: split_paths(cfg, split, exclude) for split in ("train", "val")}
    paths["test"] = read_split(cfg, "test", exclude) or []
    return build_datasets(DataSettings.from_config(cfg), paths, log)


def build_data(cfg: DictConfig, ctx: DistContext, settings: EvalSettings) -> TrainData:
    """The dataset doctor (rank 0: it logs its report and writes it to check.report_dir; a split that leaks
    a group of near-duplicates across splits stops the run unless train.allow_leaks), the datasets and the
    negatives folder checked against every split image."""
    refuse_leaks = not bool(cfg.train.allow_leaks)
    excluded = on_main(ctx, lambda: check_dataset(cfg, refuse_leaks=refuse_leaks).excluded_images)
    datasets = datasets_of(cfg, exclude=excluded, log=ctx.is_main)
    if len(datasets["train"].image_paths) == 0:
        raise UserError(f"no training images: {Path(cfg.splits_dir) / 'train.csv'} lists none")
    negatives = on_main(ctx, check_negatives, settings, split_image_paths(cfg))
    data_settings = DataSettings.from_config(cfg)
    return TrainData(
        datasets=datasets,
        train_collate=build_collate(data_settings, train=True),
        eval_collate=build_collate(data_settings, train=False),
        negatives=negatives if ctx.is_main else [],  # rank 0 measures them
    )


def check_negatives(settings: EvalSettings, split_images: list[Path]) -> list[Path]:
    """The held-out background images (train.negatives_path); an image also in train/val/test stops the run
    here (its FPPI would flatter the model)."""

    negatives = check_negatives_disjoint(settings.negatives_path, split_images, settings.check_workers)
    if negatives:
        logger.info(
            f"{len(negatives)} negatives in {settings.negatives_path}: FPPI and clean-image rate at every "
            "validation"
        )
    return negatives


# ---------------------------------------------------------------------------------------------- model


def arch_overrides(settings: TrainSettings, ctx: DistContext, resumed: RunCheckpoint | None) -> dict:
    """Architecture details a checkpoint fixes (decoder FFN width, LAB blocks, backbone BN kind): the
    released COCO files differ there from the size table, and the model must be built to fit them."""
    if resumed is not None:
        return resumed.spec.arch_overrides
    if not settings.pretrained_model_path:
        return {}

    overrides = checkpoint_arch_overrides(settings.pretrained_model_path)
    if overrides and ctx.is_main:
        logger.info(f"architecture taken from the pretrained checkpoint: {overrides}")
    return overrides


def build_model_parts(
    spec: ModelSpec, settings: TrainSettings, ctx: DistContext, precision: Precision
) -> ModelParts:
    """Model (+ pretrained weights), criterion, postprocessor and EMA on the run's device."""
    model, criterion, postprocessor = build(spec, settings.losses)
    # Parameters the size's own recipe freezes (the stem of l / x) stay frozen whatever we do later.
    trainable_backbone = [p for p in backbone_parameters(model) if p.requires_grad]
    if settings.pretrained_model_path and not settings.resume:

        # It logs what it loaded, re-initialised (class heads) and copied from COCO rows.
        load_pretrained(model, settings.pretrained_model_path, class_names=spec.class_names)
    elif ctx.is_main and not settings.resume:
        logger.info("training from scratch (train.pretrained_model_path is null)")
    model.to(ctx.device)
    apply_channels_last(model, precision)
    if ctx.distributed and ctx.device.type == "cuda" and settings.step.batch_size < settings.sync_bn_below:
        # Few images per GPU give noisy BatchNorm statistics: compute them over all GPUs instead.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = ModelEMA(model, settings.ema_decay, settings.ema_warmups) if settings.use_ema else None
    # False-positive control (train.dn_negatives, bg_loss_weight, cls_loss); all off = the official loss.
    set_denoising_queries(model, settings.num_denoising)
    set_denoising_negatives(model, settings.dn_negatives, settings.dn_negative_iou)
    return ModelParts(model, criterion.to(ctx.device), postprocessor, ema, trainable_backbone)


def steps_per_epoch(dataset, settings: TrainSettings, ctx: DistContext) -> list[int]:
    """Optimizer steps of every epoch (the train set shrinks while background images are ignored)."""
    step = settings.step
    logger.disable("src.dl.train.dataset")  # set_epoch logs mosaic closing: not for this dry run
    try:
        return [
            math.ceil(batches_in_epoch(dataset, epoch, step.batch_size, step.max_steps_per_epoch, ctx)
                      / step.accumulation)
            for epoch in range(settings.epochs)
        ]  # fmt: skip
    finally:
        logger.enable("src.dl.train.dataset")


def build_optimization(
    model: nn.Module, settings: TrainSettings, steps_per_epoch: list[int], precision: Precision, log: bool
) -> Optimization:
    optim = settings.optim
    optimizer = build_optimizer(model, optim.base_lr, optim.backbone_lr, optim.weight_decay, optim.betas)
    # train.scheduler: onecycle or DEIM's flat_cosine (its phases are epoch boundaries, hence the list)
    scheduler = build_lr_scheduler(optimizer, optim.schedule, steps_per_epoch)
    if log and hasattr(scheduler, "describe"):
        logger.info(f"LR schedule: {scheduler.describe()}")
    # Loss scaling only for fp16: bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler("cuda", enabled=precision.grad_scaler)
    return Optimization(optimizer, scheduler, scaler, sum(steps_per_epoch), optim.clip_max_norm)


def log_setup(trainer: Trainer) -> None:
    settings, spec, ctx = trainer.settings, trainer.spec, trainer.ctx
    n_params = sum(p.numel() for p in trainer.model.parameters())
    one_class = f" (use_one_class: {len(spec.data_class_names)} data classes as one)" * spec.use_one_class
    logger.info(
        f"{spec.display_name}, {spec.num_classes} classes{one_class}, "
        f"{n_params / 1e6:.2f}M parameters, input {list(spec.img_size)}, device {ctx.device}, "
        f"{ctx.world_size} process(es), AMP {trainer.precision.name}"
    )
    step, optim = settings.step, settings.optim
    effective = step.batch_size * step.accumulation * ctx.world_size
    logger.info(
        f"batch {step.batch_size} x accumulation {step.accumulation} x {ctx.world_size} process(es) = "
        f"{effective}; {trainer.optimization.total_steps} optimizer steps over {settings.epochs} epochs; "
        f"peak LR {optim.base_lr:g} (backbone {optim.backbone_lr:g}); EMA {'on' if trainer.ema else 'off'}"
    )
