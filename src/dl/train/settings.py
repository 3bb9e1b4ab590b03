"""The training stage's settings: config.yaml's `train` section read once, cast and checked, as plain values.

    settings = TrainSettings.from_config(cfg)     # src/dl/train/run.py, once per run
    Trainer(..., settings, ...)                    # every part below takes the slice it needs

config.yaml holds every default; nothing here repeats one. The parts of training take these frozen
dataclasses (or single values from them), never the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from src.common.config_rules import label_names
from src.common.errors import ConfigError
from src.models.archs import check_arch
from src.models.family import LossSettings

LOGGER_NAMES = ("csv", "tensorboard", "wandb")  # train.loggers: src/dl/train/loggers.py builds them


@dataclass(frozen=True)
class DataSettings:
    """What the datasets and the training collate need (src/dl/train/dataset.py)."""

    data_path: Path  # images/ and labels/ live here
    img_size: tuple[int, int]  # network input (h, w)
    keep_ratio: bool  # letterbox (True) or plain resize
    use_one_class: bool  # every class trained as one
    label_names: tuple[str, ...]  # the data's classes, ids 0..N-1
    segment: bool  # model.task=segment: masks from the polygons
    allow_box_only: bool  # segment: objects without a polygon train without mask loss
    clip_tolerance: float  # check.clip_tolerance: how far a label may stick out of its image
    seed: int
    epochs: int
    augs: dict  # train.augs: probability of each albumentations transform
    mosaic: dict  # train.mosaic (prob, no_mosaic_epochs and the affine's ranges)
    no_aug_epochs: int  # the last epochs without any augmentation
    mixup_prob: float
    mixup_epochs: list | None  # train.mixup.epochs: [start, end) (end null: up to the no-aug tail)
    ignore_background_epochs: int
    multiscale_prob: float
    cache: str  # train.cache: off | ram | disk
    cache_dir: Path

    @property
    def augmented_until(self) -> int:
        """The first epoch without augmentation (mosaic, mixup, albumentations, multiscale)."""
        return self.epochs - self.no_aug_epochs

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DataSettings:
        tc = cfg.train
        return cls(
            data_path=Path(cfg.data_path),
            img_size=(int(cfg.model.img_size[0]), int(cfg.model.img_size[1])),
            keep_ratio=bool(cfg.model.keep_ratio),
            use_one_class=bool(cfg.model.use_one_class),
            label_names=tuple(label_names(cfg)),
            segment=cfg.model.task == "segment",
            allow_box_only=bool(tc.allow_box_only),
            clip_tolerance=float(cfg.check.clip_tolerance),
            seed=int(cfg.seed),
            epochs=int(tc.epochs),
            augs=OmegaConf.to_container(tc.augs, resolve=True),
            mosaic=OmegaConf.to_container(tc.mosaic, resolve=True),
            no_aug_epochs=int(tc.no_aug_epochs),
            mixup_prob=float(tc.mixup.prob),
            mixup_epochs=OmegaConf.to_container(tc.mixup.epochs) if tc.mixup.epochs is not None else None,
            ignore_background_epochs=int(tc.ignore_background_epochs),
            multiscale_prob=float(tc.multiscale_prob),
            cache=str(tc.cache),
            cache_dir=Path(tc.cache_dir),
        )


@dataclass(frozen=True)
class ScheduleSettings:
    """train.scheduler and its options (src/dl/train/optim.py: build_lr_scheduler)."""

    name: str  # onecycle | flat_cosine
    warmup_pct: float  # onecycle: share of steps rising to the peak LR
    warmup_steps: int  # flat_cosine: quadratic warm-up steps (capped at the flat phase)
    flat_epochs: int | None  # flat_cosine: LR flat until this epoch (None: half of the epochs)
    min_lr_ratio: float  # flat_cosine: where the cosine ends, as a share of each group's peak LR
    no_aug_epochs: int  # flat_cosine: the cosine ends where these last epochs begin


@dataclass(frozen=True)
class OptimSettings:
    base_lr: float  # peak LR of everything but the backbone
    backbone_lr: float
    weight_decay: float
    betas: tuple[float, float]
    clip_max_norm: float  # 0: no clipping
    schedule: ScheduleSettings


@dataclass(frozen=True)
class StepSettings:
    """What the epoch loop needs (src/dl/train/epoch.py)."""

    batch_size: int  # per process
    accumulation: int  # batches per optimizer step
    max_bad_steps: int  # non-finite steps in a row before the run stops
    max_steps_per_epoch: int | None  # cap on batches per epoch (None: the whole epoch)
    checkpoint_every_steps: int  # 0: off
    checkpoint_every_minutes: float  # 0: off
    abort_after_steps: int | None  # test hook: stop as if killed after this many optimizer steps


@dataclass(frozen=True)
class EvalSettings:
    """Validation while training and the final evaluation (src/dl/train/evaluation.py)."""

    epochs: int
    eval_every: int
    no_aug_epochs: int
    batch_size: int
    num_workers: int
    seed: int
    conf_thresh: float  # P/R/F1 and the confusion matrix
    iou_thresh: float
    eval_images: int  # val images drawn with boxes at each validation
    decision_metrics: tuple[str, ...]  # best.pt: the highest sum of these
    fppi_tolerance: float | None  # best.pt: lower FPPI wins within this band of the decision score
    negatives_path: str | None  # held-out background images (None or missing: off)
    negatives_max_images: int | None  # per validation while training (None: all)
    negatives_thresholds: tuple[float, ...]  # FPPI / clean rate at these scores (conf_thresh included)
    check_workers: int  # threads that hash negatives against the training images

    def validates(self, epoch: int) -> bool:
        """Is `epoch` (0-based) validated? Every eval_every-th, the last one, and the no_aug_epochs tail
        (the model changes fastest there, and best.pt usually comes from it)."""
        return (epoch + 1) % self.eval_every == 0 or epoch >= self.epochs - max(self.no_aug_epochs, 1)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    seed: int
    deterministic: bool
    resume: bool
    pretrained_model_path: str | None
    num_workers: int  # loader workers per process
    threads: int | None  # torch intra-op threads (None: automatic, re-decided each epoch)
    amp: str  # auto | off | bf16 | fp16
    compile: bool
    freeze_backbone_epochs: int
    early_stopping: int  # epochs without improvement (0: off)
    debug_images: int
    use_ema: bool
    ema_decay: float
    ema_warmups: int
    sync_bn_below: int  # DDP on GPUs: SyncBatchNorm below this per-GPU batch
    num_denoising: int  # contrastive denoising queries per batch (0: the branch off)
    dn_negatives: int  # background boxes per image in the denoising branch (0: off)
    dn_negative_iou: float
    losses: LossSettings  # the criterion's choices (cls_loss, bg_loss_weight, mask_loss)
    loggers: tuple[str, ...]  # csv | tensorboard | wandb
    wandb_project: str
    step: StepSettings
    optim: OptimSettings
    evaluation: EvalSettings

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainSettings:
        tc = cfg.train
        return cls(
            epochs=int(tc.epochs),
            seed=int(cfg.seed),
            deterministic=bool(tc.deterministic),
            resume=bool(tc.resume),
            pretrained_model_path=str(tc.pretrained_model_path) if tc.pretrained_model_path else None,
            num_workers=int(tc.num_workers),
            threads=None if tc.threads is None else int(tc.threads),
            amp="off" if tc.amp in (False, None) else str(tc.amp),  # YAML reads a bare `off` as false
            compile=bool(tc.compile),
            freeze_backbone_epochs=int(tc.freeze_backbone_epochs),
            early_stopping=int(tc.early_stopping),
            debug_images=int(tc.debug_images),
            use_ema=bool(tc.use_ema),
            ema_decay=float(tc.ema_decay),
            ema_warmups=int(tc.ema_warmups),
            sync_bn_below=int(tc.sync_bn_below),
            num_denoising=int(tc.num_denoising),
            dn_negatives=int(tc.dn_negatives.num),
            dn_negative_iou=float(tc.dn_negatives.iou_thresh),
            losses=LossSettings(
                cls_loss=str(tc.cls_loss),
                bg_loss_weight=float(tc.bg_loss_weight),
                mask_loss=OmegaConf.to_container(tc.mask_loss, resolve=True),
            ),
            loggers=logger_names(tc),
            wandb_project=str(tc.wandb_project),
            step=_step_settings(tc),
            optim=_optim_settings(cfg),
            evaluation=_eval_settings(cfg),
        )


def _step_settings(tc: DictConfig) -> StepSettings:
    return StepSettings(
        batch_size=int(tc.batch_size),
        accumulation=max(int(tc.accumulation_steps), 1),
        max_bad_steps=int(tc.max_bad_steps),
        max_steps_per_epoch=int(tc.max_steps_per_epoch) if tc.max_steps_per_epoch else None,
        checkpoint_every_steps=int(tc.checkpoint_every_steps or 0),
        checkpoint_every_minutes=float(tc.checkpoint_every_minutes or 0),
        abort_after_steps=int(tc.abort_after_steps) if tc.abort_after_steps else None,
    )


def _optim_settings(cfg: DictConfig) -> OptimSettings:
    tc = cfg.train
    base_lr, backbone_lr = train_lrs(tc.lrs, str(cfg.model.arch), str(cfg.model.name))
    flat = tc.flat_cosine
    schedule = ScheduleSettings(
        name=str(tc.scheduler),
        warmup_pct=float(tc.warmup_pct),
        warmup_steps=int(flat.warmup_steps),
        flat_epochs=None if flat.flat_epochs is None else int(flat.flat_epochs),
        min_lr_ratio=float(flat.min_lr_ratio),
        no_aug_epochs=int(tc.no_aug_epochs),
    )
    return OptimSettings(
        base_lr=base_lr,
        backbone_lr=backbone_lr,
        weight_decay=float(tc.weight_decay),
        betas=(float(tc.betas[0]), float(tc.betas[1])),
        clip_max_norm=float(tc.clip_max_norm),
        schedule=schedule,
    )


def _eval_settings(cfg: DictConfig) -> EvalSettings:
    tc = cfg.train
    conf = float(tc.conf_thresh)
    return EvalSettings(
        epochs=int(tc.epochs),
        eval_every=int(tc.eval_every),
        no_aug_epochs=int(tc.no_aug_epochs),
        batch_size=int(tc.batch_size),
        num_workers=int(tc.num_workers),
        seed=int(cfg.seed),
        conf_thresh=conf,
        iou_thresh=float(tc.iou_thresh),
        eval_images=int(tc.eval_images),
        decision_metrics=tuple(str(name) for name in tc.decision_metrics),
        fppi_tolerance=None if tc.fppi_tolerance is None else float(tc.fppi_tolerance),
        negatives_path=str(tc.negatives_path) if tc.negatives_path else None,
        negatives_max_images=None if tc.negatives_max_images is None else int(tc.negatives_max_images),
        negatives_thresholds=measured_thresholds(tc.negatives_thresholds, conf),
        check_workers=int(cfg.check.workers),
    )


def measured_thresholds(negatives_thresholds, conf_thresh: float) -> tuple[float, ...]:
    """Scores the negatives are measured at: train.negatives_thresholds plus train.conf_thresh (the FPPI
    that train.fppi_tolerance compares), sorted."""
    return tuple(sorted({*(float(t) for t in negatives_thresholds), float(conf_thresh)}))


def train_lrs(lrs: Mapping, arch: str, model_name: str) -> tuple[float, float]:
    """(base_lr, backbone_lr) of train.lrs for the model: the entry `<arch>_<name>` wins over `<name>`,
    since sizes of different families share names with different official LRs (DETR's and RT-DETRv2's r50)."""
    check_arch(arch, model_name)  # an unknown size is named as such, not as a missing LR entry
    qualified = f"{arch}_{model_name}"
    name = qualified if qualified in lrs else model_name
    if name not in lrs:
        raise ConfigError(
            f"train.lrs has no entry for model.arch={arch} model.name={model_name}; add "
            f"train.lrs.{qualified}={{base_lr: ..., backbone_lr: ...}}"
        )
    entry = lrs[name]
    return float(entry["base_lr"]), float(entry["backbone_lr"])


def logger_names(tc: DictConfig) -> tuple[str, ...]:
    """train.loggers, checked; the old train.use_wandb=true adds wandb (with a note naming the new key)."""
    names = [str(name) for name in (OmegaConf.select(tc, "loggers") or [])]
    unknown = [name for name in names if name not in LOGGER_NAMES]
    if unknown:
        raise ConfigError(
            f"train.loggers: unknown logger(s) {', '.join(unknown)}; choose from {', '.join(LOGGER_NAMES)}"
        )
    if OmegaConf.select(tc, "use_wandb") and "wandb" not in names:
        logger.warning("train.use_wandb=true is the old name of train.loggers=[...,wandb]: wandb added")
        names.append("wandb")
    return tuple(dict.fromkeys(names))
