"""Train D-FINE on the split data set and leave a complete, self-describing experiment folder.

    python -m src.dl.train exp_name=my_run model.name=s train.epochs=50
    torchrun --standalone --nproc_per_node=2 -m src.dl.train exp_name=my_run      # DDP, one node
    python -m src.dl.train exp_name=my_run train.resume=true                      # continue after a stop

Order of work: dataset doctor -> data loaders -> model (+ pretrained weights) -> optimizer / OneCycle / EMA /
AMP -> epochs (train, validate with the EMA weights, checkpoint) -> final evaluation of best.pt on val and
test. Everything lands in output/<exp_name>/ (see `ExperimentFiles`).

Resume is exact: last.pt holds the model, EMA, optimizer, scheduler, grad scaler, the position (epoch and
batch), early-stopping state, history and every rank's RNG state. It is written at the end of each epoch
and also mid-epoch (train.checkpoint_every_steps / train.checkpoint_every_minutes), always atomically.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.common.config import exp_dir, label_names, save_run_config, stage_main
from src.common.hardware import apply_channels_last
from src.common.io import atomic_torch_save, atomic_write_csv, atomic_write_json
from src.dl.train.ema import ModelEMA, unwrap_model
from src.dl.train.optim import backbone_parameters, build_lr_scheduler, build_optimizer, group_lrs
from src.dl.train.trainer_utils import (
    DistContext,
    EpochShuffleSampler,
    ShardSampler,
    all_gather_objects,
    any_rank,
    barrier,
    broadcast_object,
    cleanup_distributed,
    format_duration,
    maybe_compile,
    memory_used_gb,
    plot_curves,
    remove_sink_safely,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    setup_speed,
    sum_loss_kinds,
    to_float32,
    write_history,
)

CHECKPOINT_VERSION = 1


class TrainingAborted(RuntimeError):
    """Raised by the train.abort_after_steps test hook: the run stops as if killed (no final evaluation)."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


# Everything the trainer writes into output/<exp_name>/ (attribute name -> file). train.overwrite replaces
# exactly these; anything else in the folder (exports, notes) is left alone.
EXPERIMENT_FILES = {
    "config": "config.yaml",
    "log": "train_log.txt",
    "history": "history.csv",
    "curves": "curves.png",
    "last": "last.pt",
    "best": "best.pt",
    "metrics": "metrics.csv",
    "per_class": "per_class.csv",
    "thresholds": "thresholds.json",
    "plots": "plots",
    "debug_images": "debug_images",
    "eval_preds": "eval_preds",
}


class ExperimentFiles:
    """Paths of EXPERIMENT_FILES inside one experiment folder: files.best, files.history, ..."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for attribute, name in EXPERIMENT_FILES.items():
            setattr(self, attribute, self.root / name)


@dataclass
class TrainState:
    """Where training is; saved in last.pt so a resumed run continues at exactly this point."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of `epoch` already trained
    global_step: int = 0  # optimizer steps taken
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)
    best_thresholds: dict = field(default_factory=dict)
    # Highest decision score seen (train.fppi_tolerance: the band is measured from it, see prefer_lower_fppi).
    peak_score: float = -math.inf


# ---------------------------------------------------------------------------------------------- config


def train_lrs(cfg: DictConfig) -> tuple[float, float]:
    """(base_lr, backbone_lr) for the model size from train.lrs."""
    name = str(cfg.model.name)
    if name not in cfg.train.lrs:
        raise ValueError(
            f"train.lrs has no entry for model.name={name}; add train.lrs.{name}.{{base_lr,backbone_lr}}"
        )
    lrs = cfg.train.lrs[name]
    return float(lrs.base_lr), float(lrs.backbone_lr)


def num_classes_of(cfg: DictConfig) -> int:
    return 1 if cfg.model.get("use_one_class", False) else len(label_names(cfg))


def class_names_of(cfg: DictConfig) -> list[str]:
    return ["object"] if cfg.model.get("use_one_class", False) else label_names(cfg)


def classification_loss_of(cfg: DictConfig) -> str:
    """train.cls_loss: vfl | mal, or auto = each variant's own (DEIM trains with MAL, D-FINE with VFL)."""
    choice = str(cfg.train.get("cls_loss", "auto")).lower()
    if choice == "auto":
        return "mal" if str(cfg.model.variant) == "deim" else "vfl"
    if choice not in ("vfl", "mal"):
        raise ValueError(f"train.cls_loss must be auto, vfl or mal, got {cfg.train.cls_loss!r}")
    return choice


def follow_pretrained_variant(cfg: DictConfig) -> tuple[str, str] | None:
    """Set model.variant to the pretrained checkpoint's variant where the file shows it (checkpoint_variant).

    Runs before the run's config is saved and before any model or criterion is built, so the experiment
    records (and later stages rebuild) the variant really trained. Returns (log level, message) to log once
    the log file is open; None without pretrained weights or on resume (the saved variant is kept).
    """
    path = cfg.train.get("pretrained_model_path")
    if cfg.train.resume or not path:
        return None
    from src.d_fine.checkpoint import checkpoint_variant

    variant, reason = checkpoint_variant(str(path))
    configured = str(cfg.model.variant)
    if variant is None:
        other = "deim" if configured == "dfine" else "dfine"
        return "INFO", (
            f"pretrained {path}: {reason}. Training model.variant={configured}; "
            f"if these are {other} weights, set model.variant={other}"
        )
    if variant == configured:
        return "INFO", f"pretrained {path} is model.variant={variant} ({reason})"
    OmegaConf.update(cfg, "model.variant", variant)
    return "WARNING", (
        f"MODEL VARIANT CHANGED: model.variant={configured}, but the pretrained checkpoint {path} is "
        f"{variant} ({reason}). Training model.variant={variant} to match the weights; it is saved with the "
        "experiment. To really train the other variant, start from a checkpoint of it or from scratch."
    )


# Keys a resumed run may change (they do not change the result); everything else comes from last.pt.
RESUME_RUNTIME_KEYS = (
    "device",
    "train.resume",
    "train.num_workers",
    "train.threads",
    "train.compile",
    "train.cache",
    "train.cache_dir",
    "train.use_wandb",
    "train.abort_after_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
)


def config_for_resume(cfg: DictConfig, saved: dict) -> DictConfig:
    """The run's saved config with only RESUME_RUNTIME_KEYS taken from `cfg` (warns about other changes)."""
    resumed = OmegaConf.create(saved)
    for key in RESUME_RUNTIME_KEYS:
        value = OmegaConf.select(cfg, key)
        OmegaConf.update(resumed, key, value, force_add=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    changed = sorted(_changed_keys(now, OmegaConf.to_container(resumed, resolve=True)))
    if changed:
        logger.warning(
            f"resume: using the interrupted run's values for {', '.join(changed)} (not today's overrides)"
        )
    return resumed


def _changed_keys(now: dict, then: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in set(now) | set(then):
        a, b = now.get(key), then.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# ---------------------------------------------------------------------------------------------- experiment folder


def prepare_experiment_dir(cfg: DictConfig) -> ExperimentFiles:
    """Create output/<exp_name>/, refusing to mix two runs in one folder (rank 0 only)."""
    files = ExperimentFiles(exp_dir(cfg))
    used = files.root.is_dir() and any(files.root.iterdir())
    if cfg.train.resume:
        if not files.last.exists():
            raise FileNotFoundError(
                f"train.resume=true but {files.last} does not exist; start a new run without train.resume "
                "(or pick the exp_name of the interrupted run)"
            )
        return files
    if used and not cfg.train.overwrite:
        raise FileExistsError(
            f"experiment folder {files.root} already holds a run. Pick a new exp_name, continue it with "
            "train.resume=true, or replace it with train.overwrite=true"
        )
    if used:
        logger.warning(f"train.overwrite=true: replacing the previous run's files in {files.root}")
        for name in EXPERIMENT_FILES.values():
            path = files.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    files.root.mkdir(parents=True, exist_ok=True)
    return files


# ---------------------------------------------------------------------------------------------- W&B


class WandbLogger:
    """Optional Weights & Biases logging; any wandb failure turns it off with a warning, never stops training."""

    def __init__(self, cfg: DictConfig, enabled: bool, resume_id: str | None = None) -> None:
        self.run = None
        if not enabled:
            return
        # offline.py defaults WANDB_MODE to "disabled" for every entry point; a user asking for W&B gets
        # offline logs unless WANDB_MODE=online says otherwise.
        mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
        try:
            import wandb

            self.run = wandb.init(
                project=str(cfg.train.wandb_project),
                name=str(cfg.exp_name),
                dir=str(exp_dir(cfg)),
                config=OmegaConf.to_container(cfg, resolve=True),
                mode=mode,
                id=resume_id,
                resume="allow" if resume_id else None,
            )
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            logger.warning(f"W&B disabled: wandb.init failed ({err})")

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(values, step=step)
        except Exception as err:  # noqa: BLE001
            logger.warning(f"W&B disabled: logging failed ({err})")
            self.run = None

    def finish(self) -> None:
        if self.run is None:
            return
        with contextlib.suppress(Exception):
            self.run.finish()
        self.run = None


# ---------------------------------------------------------------------------------------------- one step


def compute_loss(
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    targets: list[dict],
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train-mode forward (under autocast when amp_dtype is set) and the loss terms, computed in float32.

    The matching costs and log-probabilities of the criterion are precision-sensitive, so the outputs are cast
    back to float32 before it, as the official engine does.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images, targets)
    loss_dict = criterion(to_float32(outputs), targets)
    return sum(loss_dict.values()), loss_dict


def clip_and_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_max_norm: float
) -> float:
    """Unscale, clip (when clip_max_norm > 0) and step unless the gradients are not finite; returns the norm.

    With fp16 the GradScaler skips inf steps itself (normal while it calibrates); otherwise a non-finite norm
    means the weights would be poisoned, so the step is skipped here.
    """
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip_max_norm if clip_max_norm > 0 else math.inf
    norm = float(nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    if math.isfinite(norm) or scaler.is_enabled():
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: DictConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.tc = cfg.train
        self.files = ExperimentFiles(exp_dir(cfg))
        self.class_names = class_names_of(cfg)
        self.num_classes = len(self.class_names)
        self.batch_size = int(self.tc.batch_size)
        self.accumulation = max(int(self.tc.accumulation_steps), 1)
        self.precision = setup_speed(self.tc, self.device, ctx.world_size)  # threads + train.amp by hardware
        self.amp_dtype = self.precision.dtype
        self.state = TrainState()
        self.partial_losses: dict = {"sums": {}, "count": 0}
        self.last_checkpoint_time = time.monotonic()
        self.wandb = WandbLogger(cfg, enabled=False)

        seed_everything(int(cfg.seed) + ctx.rank, bool(self.tc.deterministic))
        self.resume_checkpoint = (
            torch.load(self.files.last, map_location="cpu", weights_only=True) if self.tc.resume else None
        )
        self.excluded_images = self._run_doctor()
        self._build_data()
        self.negatives = self._check_negatives()
        self._build_model()
        self._build_optimization()
        resume_id = self._resume() if self.tc.resume else None
        self.wandb = WandbLogger(cfg, bool(self.tc.use_wandb) and ctx.is_main, resume_id)
        if ctx.is_main:
            self._log_setup()

    # ------------------------------------------------------------------ setup

    def _run_doctor(self) -> list[str]:
        """The dataset doctor on rank 0 (it writes the report); every rank gets its verdict."""
        from src.etl.check import check_dataset

        excluded, error = [], None
        if self.ctx.is_main:
            try:
                excluded = check_dataset(self.cfg).excluded_images  # it logs its own report
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                error = err
        error, excluded = broadcast_object(self.ctx, (error, excluded))
        if error is not None:
            raise error
        return excluded

    def _build_data(self) -> None:
        from src.dl.train.dataset import build_collate, build_datasets

        self.datasets = build_datasets(self.cfg, exclude=self.excluded_images, log=self.ctx.is_main)
        self.train_collate = build_collate(self.cfg, train=True)
        self.eval_collate = build_collate(self.cfg, train=False)
        if len(self.datasets["train"].image_paths) == 0:
            raise ValueError(f"no training images: {Path(self.cfg.splits_dir) / 'train.csv'} lists none")

    def _check_negatives(self) -> list[Path]:
        """The held-out background images (train.negatives_path) on rank 0, [] elsewhere or when absent.

        An image also in train/val/test stops the run here (its FPPI would flatter the model)."""
        from src.dl.train.negatives import check_negatives_disjoint, split_image_paths

        negatives, error = [], None
        if self.ctx.is_main:
            try:
                negatives = check_negatives_disjoint(
                    self.tc.get("negatives_path"), split_image_paths(self.cfg), int(self.cfg.check.workers)
                )
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                error = err
        error = broadcast_object(self.ctx, error)
        if error is not None:
            raise error
        if negatives:
            logger.info(
                f"{len(negatives)} negatives in {self.tc.negatives_path}: FPPI and clean-image rate at every "
                "validation"
            )
        return negatives

    def _build_model(self) -> None:
        from src.d_fine import build_criterion, build_postprocessor
        from src.d_fine.denoising import set_denoising_negatives

        self.arch_overrides = self._arch_overrides()
        self.model = build_detector(self.cfg, self.num_classes, self.arch_overrides)
        # Parameters the size's own recipe freezes (the stem of l / x) stay frozen whatever we do later.
        self.trainable_backbone = [p for p in backbone_parameters(self.model) if p.requires_grad]
        if self.tc.pretrained_model_path and not self.tc.resume:
            from src.d_fine import load_pretrained

            # It logs what it loaded, re-initialised (class heads) and copied from COCO rows.
            load_pretrained(self.model, str(self.tc.pretrained_model_path), class_names=self.class_names)
        elif self.ctx.is_main and not self.tc.resume:
            logger.info("training from scratch (train.pretrained_model_path is null)")
        self.model.to(self.device)
        apply_channels_last(self.model, self.precision)
        small_batches = self.batch_size < int(self.tc.get("sync_bn_below", 8))
        if self.ctx.distributed and self.device.type == "cuda" and small_batches:
            # Few images per GPU give noisy BatchNorm statistics: compute them over all GPUs instead.
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ema = (
            ModelEMA(self.model, float(self.tc.ema_decay), int(self.tc.ema_warmups))
            if self.tc.use_ema
            else None
        )
        # False-positive control (train.dn_negatives, bg_loss_weight, cls_loss); all off = the official loss.
        # .get: a run saved before these keys existed resumes with them off.
        negatives = self.tc.get("dn_negatives") or {}
        set_denoising_negatives(
            self.model, int(negatives.get("num", 0)), float(negatives.get("iou_thresh", 0.3))
        )
        self.criterion = build_criterion(
            str(self.cfg.model.name),
            self.num_classes,
            cls_loss=classification_loss_of(self.cfg),
            bg_loss_weight=float(self.tc.get("bg_loss_weight", 1.0)),
        ).to(self.device)
        self.postprocessor = build_postprocessor(
            self.num_classes, num_top_queries=int(self.cfg.model.num_queries)
        )
        self.backbone_frozen = False
        self.ddp_model = self._wrap_ddp()

    def _arch_overrides(self) -> dict:
        """Architecture details a checkpoint fixes (decoder FFN width, LAB blocks, backbone BN kind): the
        released COCO files differ there from the size table, and the model must be built to fit them."""
        if self.tc.resume:
            return dict(self.resume_checkpoint["meta"].get("arch_overrides") or {})
        if not self.tc.pretrained_model_path:
            return {}
        from src.d_fine import checkpoint_arch_overrides

        overrides = checkpoint_arch_overrides(str(self.tc.pretrained_model_path))
        if overrides and self.ctx.is_main:
            logger.info(f"architecture taken from the pretrained checkpoint: {overrides}")
        return overrides

    def _wrap_ddp(self) -> nn.Module:
        """DDP over the plain model; re-done when the backbone is (un)frozen, as DDP fixes its parameter set."""
        if not self.ctx.distributed:
            return maybe_compile(self.model, bool(self.tc.compile))
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a batch without any box (background-only) has no denoising queries, so the
        # denoising embedding gets no gradient in that step.
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=device_ids, find_unused_parameters=True
        )

    def _build_optimization(self) -> None:
        base_lr, backbone_lr = train_lrs(self.cfg)
        self.optimizer = build_optimizer(
            self.model, base_lr, backbone_lr, float(self.tc.weight_decay), tuple(self.tc.betas)
        )
        steps_per_epoch = [math.ceil(n / self.accumulation) for n in self._batches_per_epoch_all()]
        self.total_steps = sum(steps_per_epoch)
        # train.scheduler: onecycle or DEIM's flat_cosine (its phases are epoch boundaries, hence the list)
        self.scheduler = build_lr_scheduler(self.optimizer, self.tc, steps_per_epoch)
        if self.ctx.is_main and hasattr(self.scheduler, "describe"):
            logger.info(f"LR schedule: {self.scheduler.describe()}")
        # Loss scaling only for fp16: bf16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.grad_scaler)

    def _batches_per_epoch_all(self) -> list[int]:
        """Batches of every epoch (the train set shrinks while background images are ignored)."""
        logger.disable("src.dl.train.dataset")  # set_epoch logs mosaic closing: not for this dry run
        try:
            return [self.batches_in_epoch(epoch) for epoch in range(int(self.tc.epochs))]
        finally:
            logger.enable("src.dl.train.dataset")

    def batches_in_epoch(self, epoch: int) -> int:
        per_rank = self._train_sampler(epoch).per_rank
        batches = per_rank // self.batch_size if per_rank >= self.batch_size else 1
        cap = self.tc.get("max_steps_per_epoch")
        return min(batches, int(cap)) if cap else batches

    def _resume(self) -> str | None:
        """Load last.pt into every piece; returns the W&B run id to continue."""
        checkpoint, self.resume_checkpoint = self.resume_checkpoint, None  # free it once loaded
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(**checkpoint["state"])
        rng_states = checkpoint.get("rng") or []
        if len(rng_states) == self.ctx.world_size:
            set_rng_state(rng_states[self.ctx.rank])
            self.partial_losses = checkpoint["partial_losses"][self.ctx.rank]
        elif self.ctx.is_main:
            logger.warning(
                f"resume: last.pt was written by {len(rng_states)} process(es), now {self.ctx.world_size}: "
                "random streams start afresh (the run continues, not bit-for-bit)"
            )
        if self.ctx.is_main:
            logger.info(
                f"resuming {self.files.last}: epoch {self.state.epoch + 1}, batch {self.state.batch}, "
                f"optimizer step {self.state.global_step}/{self.total_steps}"
            )
        return checkpoint.get("wandb_id")

    def _log_setup(self) -> None:
        base_lr, backbone_lr = train_lrs(self.cfg)
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.info(
            f"D-FINE-{self.cfg.model.name} ({self.cfg.model.variant}), {self.num_classes} classes, "
            f"{n_params / 1e6:.2f}M parameters, input {list(self.cfg.model.img_size)}, device {self.device}, "
            f"{self.ctx.world_size} process(es), AMP {self.precision.name}"
        )
        effective = self.batch_size * self.accumulation * self.ctx.world_size
        logger.info(
            f"batch {self.batch_size} x accumulation {self.accumulation} x {self.ctx.world_size} process(es) = "
            f"{effective}; {self.total_steps} optimizer steps over {self.tc.epochs} epochs; "
            f"peak LR {base_lr:g} (backbone {backbone_lr:g}); EMA {'on' if self.ema else 'off'}"
        )

    # ------------------------------------------------------------------ data loaders

    def _train_sampler(self, epoch: int) -> EpochShuffleSampler:
        dataset = self.datasets["train"]
        dataset.set_epoch(epoch)  # mosaic/mixup windows, no-aug epochs, background-ignoring follow the epoch
        if hasattr(self.train_collate, "set_epoch"):
            self.train_collate.set_epoch(epoch)  # multiscale stops in the no-aug epochs
        if len(dataset) == 0:
            raise ValueError(
                f"epoch {epoch + 1}: no training image has a box, and train.ignore_background_epochs="
                f"{self.tc.ignore_background_epochs} leaves background images out; lower it or add labels"
            )
        return EpochShuffleSampler(len(dataset), int(self.cfg.seed), self.ctx.rank, self.ctx.world_size)

    def _loader_generator(self, epoch: int) -> torch.Generator:
        # The DataLoader draws its worker seeds from this generator instead of the global RNG: a resumed epoch
        # gives its workers the same seeds as the original one.
        return torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + epoch * 1009 + self.ctx.rank)

    def train_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        sampler = self._train_sampler(epoch)
        sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=int(self.tc.num_workers),
            collate_fn=self.train_collate,
            pin_memory=self.device.type == "cuda",
            drop_last=sampler.per_rank >= self.batch_size,
            generator=self._loader_generator(epoch),
        )

    def eval_loader(self, split: str) -> DataLoader | None:
        dataset = self.datasets.get(split)
        if dataset is None or len(dataset) == 0:
            return None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=ShardSampler(len(dataset), self.ctx.rank, self.ctx.world_size),
            num_workers=int(self.tc.num_workers),
            collate_fn=self.eval_collate,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),
        )

    # ------------------------------------------------------------------ freezing

    def _set_backbone_frozen(self, frozen: bool) -> None:
        if frozen == self.backbone_frozen:
            return
        for param in self.trainable_backbone:
            param.requires_grad_(not frozen)
        self.backbone_frozen = frozen
        if self.ctx.distributed:
            self.ddp_model = self._wrap_ddp()
        if self.ctx.is_main:
            logger.info("backbone frozen" if frozen else "backbone unfrozen")

    def _train_mode(self) -> None:
        self.ddp_model.train()
        self.criterion.train()
        if self.backbone_frozen:
            # A frozen backbone keeps its BatchNorm statistics too (they would drift on the new data).
            unwrap_model(self.model).backbone.eval()

    # ------------------------------------------------------------------ epochs

    def fit(self) -> dict:
        """Train the remaining epochs, then evaluate best.pt on val and test; returns the run summary."""
        epochs, freeze_epochs = int(self.tc.epochs), int(self.tc.freeze_backbone_epochs)
        early_stop = int(self.tc.early_stopping)
        if self.state.epoch == 0 and self.state.batch == 0 and self.ctx.is_main:
            self.datasets["train"].set_epoch(0)
            self._save_debug_images()
        stopped_early = False
        for epoch in range(self.state.epoch, epochs):
            self.state.epoch = epoch
            self._set_backbone_frozen(epoch < freeze_epochs)
            started = time.perf_counter()
            losses = self._mean_over_ranks(self.train_one_epoch(epoch))
            row = {"epoch": epoch + 1, **losses, **group_lrs(self.optimizer)}
            row["train_time_s"] = round(time.perf_counter() - started, 2)
            row.update(self.validate(epoch))
            row["epoch_time_s"] = round(time.perf_counter() - started, 2)
            self.state.history.append(row)
            self.state.epoch, self.state.batch = epoch + 1, 0
            self.save_last()
            if self.ctx.is_main:
                self._write_epoch_files(row)
            if early_stop and self.state.epochs_without_improvement >= early_stop:
                stopped_early = True
                if self.ctx.is_main:
                    logger.info(
                        f"early stopping: no improvement for {early_stop} epoch(s) "
                        f"(best: epoch {self.state.best_epoch + 1})"
                    )
                break
        summary = self.final_evaluation()
        summary.update(epochs_trained=self.state.epoch, stopped_early=stopped_early)
        return summary

    def _mean_over_ranks(self, values: dict) -> dict:
        per_rank = all_gather_objects(self.ctx, values)
        keys = list(dict.fromkeys(k for d in per_rank for k in d))
        return {k: sum(d.get(k, 0.0) for d in per_rank) / len(per_rank) for k in keys}

    def _save_debug_images(self) -> None:
        from src.dl.train.dataset import save_all_debug_images

        n = int(self.tc.debug_images)
        if n > 0:
            saved = save_all_debug_images(self.datasets, self.files.root, n)
            logger.info(f"{len(saved)} processed samples drawn in {self.files.debug_images}")

    def _write_epoch_files(self, row: dict) -> None:
        write_history(self.state.history, self.files.history)
        plot_curves(self.state.history, self.files.curves, CURVE_METRICS)
        self.wandb.log(
            {k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.state.global_step
        )

    # ------------------------------------------------------------------ one epoch

    def train_one_epoch(self, epoch: int) -> dict:
        """Train `epoch` from batch self.state.batch to its end; returns the mean of each loss kind."""
        n_batches = self.batches_in_epoch(epoch)
        start = self._start_batch = self.state.batch
        loader = self.train_loader(epoch, start)
        self._train_mode()
        # Loss sums of this rank's batches so far; restored on resume so the epoch mean covers the whole epoch.
        if start == 0:
            self.partial_losses = {"sums": {}, "count": 0}
        sums: dict[str, float] = self.partial_losses["sums"]
        images_seen, bad_in_row = 0, 0
        started = time.perf_counter()
        bar = tqdm(
            total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{self.tc.epochs}", unit="batch",
            disable=not self.ctx.is_main, dynamic_ncols=True, leave=False,
        )  # fmt: skip
        for batch_index, (images, targets) in enumerate(self._device_batches(loader), start=start):
            if batch_index >= n_batches:
                break
            window_start = batch_index - batch_index % self.accumulation
            window_size = min(self.accumulation, n_batches - window_start)
            window_end = batch_index + 1 == window_start + window_size
            # Gradients of a window's earlier batches stay local; only its last backward all-reduces.
            skip_sync = self.ctx.distributed and not window_end
            with self.ddp_model.no_sync() if skip_sync else contextlib.nullcontext():
                loss, loss_dict = compute_loss(
                    self.ddp_model, self.criterion, images, targets, self.amp_dtype
                )
                bad = any_rank(self.ctx, not bool(torch.isfinite(loss)))
                if not bad:
                    self.scaler.scale(loss / window_size).backward()
            if not bad and window_end:
                bad = not self._optimizer_step()
            if bad:
                bad_in_row = self._handle_bad_step(bad_in_row + 1, epoch, batch_index, loss_dict)
            else:
                bad_in_row = 0
                for kind, value in sum_loss_kinds(loss_dict).items():
                    sums[kind] = sums.get(kind, 0.0) + value
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                self.partial_losses["count"] += 1
            images_seen += images.shape[0]
            self.state.batch = batch_index + 1
            if window_end:
                self._after_window(epoch, n_batches)
            bar.update(1)
            if self.ctx.is_main:
                bar.set_postfix(self._progress(sums, images_seen, started, epoch, n_batches))
        bar.close()
        self.optimizer.zero_grad(set_to_none=True)  # a window cut short by a bad loss leaves gradients
        counted = max(self.partial_losses["count"], 1)
        return {kind: total / counted for kind, total in sums.items()}

    def _device_batches(self, loader: DataLoader):
        for images, targets in loader:
            images = images.to(self.device, non_blocking=True)
            targets = [
                {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                for t in targets
            ]
            yield images, targets

    def _optimizer_step(self) -> bool:
        """One optimizer step (+ OneCycle, EMA); False when the gradients were not finite (step skipped)."""
        norm = clip_and_step(self.model, self.optimizer, self.scaler, float(self.tc.clip_max_norm))
        if not math.isfinite(norm) and not self.scaler.is_enabled():
            return False
        self.state.global_step += 1
        # OneCycle covers steps 0 .. total_steps - 1; stepping past the end would raise the LR again.
        if self.state.global_step < self.total_steps:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return True

    def _handle_bad_step(self, bad_in_row: int, epoch: int, batch_index: int, loss_dict: dict) -> int:
        """A non-finite loss or gradient: drop the window's gradients, stop after train.max_bad_steps in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        bad_terms = [k for k, v in loss_dict.items() if not torch.isfinite(v).all()]
        if self.ctx.is_main:
            where = ", ".join(bad_terms) if bad_terms else "gradients or another rank's loss"
            logger.warning(
                f"non-finite values at epoch {epoch + 1}, batch {batch_index + 1} ({where}): step skipped"
            )
        if bad_in_row >= int(self.tc.max_bad_steps):
            raise TrainingDiverged(
                f"{bad_in_row} non-finite losses/gradients in a row (train.max_bad_steps={self.tc.max_bad_steps}); "
                "training stopped. Usual causes: a learning rate too high (lower train.lrs), fp16 overflow "
                "(use train.amp=bf16 or off), or broken labels (run `make check`). "
                f"The last good state is in {self.files.last} (continue with train.resume=true)."
            )
        return bad_in_row

    def _progress(self, sums: dict, images_seen: int, started: float, epoch: int, n_batches: int) -> dict:
        elapsed = max(time.perf_counter() - started, 1e-9)
        done = max(self.state.batch - self._start_batch, 1)
        remaining = (n_batches - self.state.batch) + (int(self.tc.epochs) - epoch - 1) * n_batches
        lrs = group_lrs(self.optimizer)
        return {
            "loss": f"{sums.get('loss', math.nan) / max(self.partial_losses['count'], 1):.3f}",
            "lr": f"{lrs.get('lr_rest', next(iter(lrs.values()))):.2e}",
            "img/s": f"{images_seen * self.ctx.world_size / elapsed:.1f}",
            "eta": format_duration(remaining * elapsed / done),  # the whole run, without validation
            "mem": f"{memory_used_gb(self.device):.2f}G",
        }

    def _after_window(self, epoch: int, n_batches: int) -> None:
        """Mid-epoch checkpoint when due, then the abort test hook."""
        if self.state.batch < n_batches:  # the end-of-epoch checkpoint comes right after validation
            every_steps = int(self.tc.get("checkpoint_every_steps") or 0)
            every_minutes = float(self.tc.get("checkpoint_every_minutes") or 0)
            due = every_steps > 0 and self.state.global_step % every_steps == 0
            if every_minutes > 0:
                # Clocks differ between ranks: rank 0 decides for everyone (saving is collective).
                late = self.ctx.is_main and time.monotonic() - self.last_checkpoint_time >= every_minutes * 60
                due = any_rank(self.ctx, due or late)
            if due:
                self.save_last()
        abort_after = self.tc.get("abort_after_steps")
        if abort_after and self.state.global_step >= int(abort_after):
            raise TrainingAborted(
                f"train.abort_after_steps={abort_after} reached (epoch {epoch + 1}, batch {self.state.batch})"
            )

    # ------------------------------------------------------------------ evaluation

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap_model(self.model)

    @torch.no_grad()
    def predict_split(self, model: nn.Module, split: str) -> tuple[list, list] | None:
        """Predictions and ground truth for every image of `split` exactly once, on rank 0 (None elsewhere)."""
        from src.metrics.validator import predict_batches

        loader = self.eval_loader(split)
        if loader is None:
            return None
        was_training = model.training
        model.eval()
        preds, gts = predict_batches(
            model, loader, self.device, self.postprocessor, self.amp_dtype, desc=f"eval {split}",
            show_progress=self.ctx.is_main,
        )  # fmt: skip
        model.train(was_training)
        gathered = all_gather_objects(self.ctx, (preds, gts))
        if not self.ctx.is_main:
            return None
        return [p for part, _ in gathered for p in part], [g for _, part in gathered for g in part]

    def evaluate_split(self, model: nn.Module, split: str, plots: bool):
        """ValResult of `split` on rank 0 (None elsewhere or for an empty split); plots and eval pictures."""
        from src.metrics.validator import evaluate, save_eval_images

        result = self.predict_split(model, split)
        if result is None:
            return None
        preds, gts = result
        evaluation = evaluate(
            preds, gts, self.class_names, float(self.tc.conf_thresh), float(self.tc.iou_thresh)
        )
        pictures = self.files.eval_preds / split
        shutil.rmtree(pictures, ignore_errors=True)  # only this eval's pictures
        save_eval_images(
            preds, gts, pictures, self.class_names, float(self.tc.conf_thresh), int(self.tc.eval_images)
        )
        if plots:
            evaluation.save(self.files.plots / split)
        return evaluation

    def validate(self, epoch: int) -> dict:
        """Evaluate the EMA weights on val; rank 0 judges the epoch and every rank learns the verdict."""
        model = self.eval_model()
        evaluation = self.evaluate_split(model, "val", plots=False)
        negatives = self.negatives_metrics(model) if self.ctx.is_main else {}
        verdict = self._judge_epoch(epoch, evaluation, negatives) if self.ctx.is_main else None
        verdict = broadcast_object(self.ctx, verdict)
        for key in (
            "best_score",
            "best_epoch",
            "epochs_without_improvement",
            "best_metrics",
            "best_thresholds",
            "peak_score",
        ):
            setattr(self.state, key, verdict[key])
        return verdict["metrics"]

    def negatives_metrics(self, model: nn.Module) -> dict[str, float]:
        """FPPI, clean-image rate and max score of `model` on the negatives folder ({} without one)."""
        if not self.negatives:
            return {}
        from src.dl.train.negatives import configured_thresholds, evaluate_negatives

        mc = self.cfg.model
        return evaluate_negatives(
            model, self.negatives, configured_thresholds(self.cfg), postprocessor=self.postprocessor,
            img_size=(int(mc.img_size[0]), int(mc.img_size[1])), keep_ratio=bool(mc.keep_ratio),
            device=self.device, batch_size=self.batch_size, num_workers=int(self.tc.num_workers),
            amp_dtype=self.amp_dtype, show_progress=self.ctx.is_main,
        )  # fmt: skip

    def _judge_epoch(self, epoch: int, evaluation, negatives: dict) -> dict:
        """This epoch's metrics (val + negatives) and whether they beat the best so far (then best.pt is
        written)."""
        state = self.state
        if evaluation is None:
            if epoch == 0:
                logger.warning("no validation images: best.pt follows the latest weights, no early stopping")
            metrics, thresholds, score = dict(negatives), {}, float(epoch)  # every epoch 'improves'
            improved = score > state.best_score
        else:
            metrics = {k: float(v) for k, v in evaluation.metrics.items()} | negatives
            thresholds, score = evaluation.thresholds, self.decision_score(metrics)
            improved = self._beats_best(metrics, score)
        if improved:
            self.save_best(metrics, thresholds, epoch + 1)
        if metrics:
            from src.dl.train.negatives import describe

            best = "new best" if improved else f"best: epoch {state.best_epoch + 1}"
            parts = [self._describe(metrics), f"negatives: {describe(negatives)}" if negatives else ""]
            logger.info(f"epoch {epoch + 1}: {'; '.join(p for p in parts if p)} ({best})")
        return {
            "metrics": metrics,
            "best_score": score if improved else state.best_score,
            "best_epoch": epoch if improved else state.best_epoch,
            "epochs_without_improvement": 0 if improved else state.epochs_without_improvement + 1,
            "best_metrics": metrics if improved else state.best_metrics,
            "best_thresholds": thresholds if improved else state.best_thresholds,
            "peak_score": max(state.peak_score, score),
        }

    def _beats_best(self, metrics: dict, score: float) -> bool:
        """Higher decision score wins; with train.fppi_tolerance, within that band of the best score the
        lower FPPI at conf_thresh wins (prefer_lower_fppi; the band hangs from the highest score seen)."""
        tolerance = self.tc.get("fppi_tolerance")
        if tolerance is None:
            return score > self.state.best_score
        from src.dl.train.negatives import fppi_key, prefer_lower_fppi

        state = self.state
        best = {**state.best_metrics, "decision_score": state.best_score} if state.best_epoch >= 0 else None
        return prefer_lower_fppi(
            {**metrics, "decision_score": score}, best, float(tolerance), fppi_key(float(self.tc.conf_thresh)),
            map_key="decision_score", peak_map=state.peak_score,
        )  # fmt: skip

    def decision_score(self, metrics: dict) -> float:
        names = list(self.tc.decision_metrics)
        missing = [n for n in names if n not in metrics]
        if missing:
            raise KeyError(f"train.decision_metrics {missing} are not computed; available: {sorted(metrics)}")
        return float(sum(float(metrics[n]) for n in names))

    def _describe(self, metrics: dict) -> str:
        shown = dict.fromkeys([*self.tc.decision_metrics, "mAP_50_95", "precision", "recall"])
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics)

    def final_evaluation(self) -> dict:
        """best.pt (loaded from disk, as every later stage will) on val and test: metrics.csv, per_class.csv,
        thresholds.json (picked on val), plots/<split>/, eval_preds/<split>/; on the negatives folder (when
        there is one): the "negatives" row of metrics.csv."""
        barrier(self.ctx)
        checkpoint = torch.load(self.files.best, map_location="cpu", weights_only=True)
        model = build_detector(self.cfg, self.num_classes, self.arch_overrides)
        model.load_state_dict(checkpoint["model"])
        model.to(self.device).eval()
        results = {split: self.evaluate_split(model, split, plots=True) for split in ("val", "test")}
        summary = {"exp_dir": str(self.files.root), "best_epoch": self.state.best_epoch + 1}
        if self.ctx.is_main:
            summary.update(self._write_final_files(checkpoint, results, self.negatives_metrics(model)))
        barrier(self.ctx)
        return broadcast_object(self.ctx, summary)

    def _write_final_files(self, checkpoint: dict, results: dict, negatives: dict) -> dict:
        import pandas as pd

        from src.dl.train.negatives import describe

        done = {split: r for split, r in results.items() if r is not None}
        rows = [{"split": split, **r.metrics} for split, r in done.items()]
        if negatives:  # its own row: the neg_* columns, nothing else (no boxes to match there)
            rows.append({"split": "negatives", **negatives})
        atomic_write_csv(self.files.metrics, pd.DataFrame(rows))
        per_class = [r.per_class.assign(split=split) for split, r in done.items()]
        if per_class:
            frame = pd.concat(per_class, ignore_index=True)
            atomic_write_csv(
                self.files.per_class, frame[["split", *[c for c in frame.columns if c != "split"]]]
            )
        # Thresholds are chosen on val only; test stays an unbiased check of them.
        thresholds = (
            done["val"].thresholds
            if "val" in done
            else {"conf_thresh": float(self.tc.conf_thresh), "per_class": {}}
        )
        atomic_write_json(self.files.thresholds, thresholds)
        checkpoint["meta"]["thresholds"] = thresholds
        if "val" in done:
            checkpoint["meta"]["metrics"] = {k: float(v) for k, v in done["val"].metrics.items()}
        atomic_torch_save(self.files.best, checkpoint)
        for split, r in done.items():
            logger.info(f"best.pt on {split}: {self._describe(r.metrics)}")
            self.wandb.log(
                {f"final/{split}/{k}": float(v) for k, v in r.metrics.items()}, step=self.state.global_step
            )
        if negatives:
            logger.info(f"best.pt on negatives: {describe(negatives)}")
            self.wandb.log(
                {f"final/negatives/{k}": v for k, v in negatives.items()}, step=self.state.global_step
            )
        logger.info(
            f"thresholds (picked on val): global {thresholds['conf_thresh']:.2f} -> {self.files.thresholds}"
        )
        summary = {split: {k: float(v) for k, v in r.metrics.items()} for split, r in done.items()}
        return summary | ({"negatives": negatives} if negatives else {}) | {"thresholds": thresholds}

    # ------------------------------------------------------------------ checkpoints

    def model_meta(self, metrics: dict, thresholds: dict, epoch: int) -> dict:
        mc = self.cfg.model
        return {
            "model_name": str(mc.name),
            "variant": str(mc.variant),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "img_size": [int(v) for v in mc.img_size],
            "keep_ratio": bool(mc.keep_ratio),
            "num_queries": int(mc.num_queries),
            "arch_overrides": dict(self.arch_overrides),  # build_model(..., arch_overrides=...) to rebuild it
            "thresholds": thresholds,
            "metrics": metrics,
            "epoch": epoch,
        }

    def save_last(self) -> None:
        """Write last.pt. Collective: every rank contributes its RNG state, rank 0 writes."""
        per_rank = all_gather_objects(self.ctx, (rng_state(), self.partial_losses))
        if self.ctx.is_main:
            checkpoint = {
                "version": CHECKPOINT_VERSION,
                "model": unwrap_model(self.model).state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": dict(vars(self.state)),
                "epoch": self.state.epoch,
                "step": self.state.global_step,
                "rng": [rng for rng, _ in per_rank],
                "partial_losses": [losses for _, losses in per_rank],  # of the unfinished epoch
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "meta": self.model_meta(
                    self.state.best_metrics, self.state.best_thresholds, self.state.best_epoch + 1
                ),
                "wandb_id": self.wandb.run_id,
            }
            atomic_torch_save(self.files.last, checkpoint)
        self.last_checkpoint_time = time.monotonic()

    def save_best(self, metrics: dict, thresholds: dict, epoch: int) -> None:
        """best.pt: the weights that are evaluated (EMA when on) + everything needed to use them."""
        checkpoint = {
            "version": CHECKPOINT_VERSION,
            "model": self.eval_model().state_dict(),
            "ema": None,
            "meta": self.model_meta(metrics, thresholds, epoch),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        atomic_torch_save(self.files.best, checkpoint)


CURVE_METRICS = ("mAP_50", "mAP_50_95", "precision", "recall", "f1")


def build_detector(cfg: DictConfig, num_classes: int, arch_overrides: dict | None = None) -> nn.Module:
    from src.d_fine import build_model

    mc = cfg.model
    return build_model(
        str(mc.name),
        num_classes,
        img_size=(int(mc.img_size[0]), int(mc.img_size[1])),
        variant=str(mc.variant),
        num_queries=int(mc.num_queries),
        arch_overrides=arch_overrides or None,
    )


# ---------------------------------------------------------------------------------------------- entry point


def run(cfg: DictConfig) -> dict:
    """Train as cfg says (under torchrun: this process's share); returns a summary (exp_dir, best metrics)."""
    ctx = setup_distributed(str(cfg.device))
    sink = None
    trainer = None
    try:
        if not ctx.is_main:
            logger.remove()  # other ranks: warnings and errors only (rank 0 tells the story)
            logger.add(sys.stderr, level="WARNING")
        if cfg.train.resume:
            cfg = config_for_resume(cfg, _saved_config(cfg))
        variant_note = follow_pretrained_variant(cfg)  # before the config is saved and the model built
        OmegaConf.update(cfg, "train.ddp", ctx.distributed, force_add=True)
        error = None
        if ctx.is_main:
            try:
                files = prepare_experiment_dir(cfg)
                if not cfg.train.resume:
                    save_run_config(cfg, files.config)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                error = err
        error = broadcast_object(ctx, error)
        if error is not None:
            raise error
        if ctx.is_main:
            sink = logger.add(ExperimentFiles(exp_dir(cfg)).log, level="INFO", enqueue=False)
            logger.info(f"experiment folder: {exp_dir(cfg)}")
            if variant_note:
                logger.log(*variant_note)
        trainer = Trainer(cfg, ctx)
        summary = trainer.fit()
        if ctx.is_main:
            logger.info(f"done: {summary}")
        return summary
    except (KeyboardInterrupt, TrainingAborted):
        if ctx.is_main and ExperimentFiles(exp_dir(cfg)).last.exists():
            logger.warning(
                f"stopped; continue with: python -m src.dl.train exp_name={cfg.exp_name} train.resume=true"
            )
        raise
    finally:
        if trainer is not None:
            trainer.wandb.finish()
        remove_sink_safely(sink)
        cleanup_distributed()


def _saved_config(cfg: DictConfig) -> dict:
    last = ExperimentFiles(exp_dir(cfg)).last
    if not last.exists():
        raise FileNotFoundError(
            f"train.resume=true but {last} does not exist; start a new run without train.resume "
            "(or pick the exp_name of the interrupted run)"
        )
    return torch.load(last, map_location="cpu", weights_only=True, mmap=True)["config"]


main = stage_main(run)
