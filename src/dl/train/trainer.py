"""The Trainer: data loaders, model (+ pretrained weights), optimizer / schedule / EMA / AMP, and the epochs
(train, validate with the EMA weights, checkpoint), then the final evaluation of best.pt on val and test.

Constructing a Trainer runs every check on config and data (dataset doctor, datasets, negatives, model) and
writes nothing; `fit()` writes into the experiment folder (src/dl/train/run.py prepares it).

Resume is exact: last.pt holds the model, EMA, optimizer, scheduler, grad scaler, the position (epoch and
batch), early-stopping state, history and every rank's RNG state. It is written at the end of each epoch
and also mid-epoch (train.checkpoint_every_steps / train.checkpoint_every_minutes), always atomically.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from src.common.errors import UserError
from src.common.experiment import Experiment
from src.common.hardware import apply_channels_last
from src.dl.train.core import TrainState
from src.dl.train.ema import ModelEMA, unwrap_model
from src.dl.train.epoch import EpochLoop
from src.dl.train.evaluation import Evaluator, check_decision_metrics
from src.dl.train.loggers import Callback, HistoryLogger, WandbLogger
from src.dl.train.optim import backbone_parameters, build_lr_scheduler, build_optimizer, group_lrs, train_lrs
from src.dl.train.trainer_utils import (
    DistContext,
    EpochShuffleSampler,
    all_gather_objects,
    barrier,
    broadcast_object,
    maybe_compile,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_speed,
)
from src.models.build import build
from src.models.checkpoint import RunCheckpoint, load_run_checkpoint, save_run_checkpoint
from src.models.family import LossSettings
from src.models.spec import ModelSpec


def on_main(ctx: DistContext, work, *args):
    """work(*args) on rank 0, its result (or its exception) on every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = work(*args)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    error, result = broadcast_object(ctx, (error, result))
    if error is not None:
        raise error
    return result


class Trainer(EpochLoop):
    def __init__(self, cfg: DictConfig, ctx: DistContext, callbacks: list[Callback] | None = None) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.tc = cfg.train
        self.exp = Experiment.of(cfg)
        self.spec = ModelSpec.from_config(cfg)  # arch overrides of a checkpoint follow in _build_model
        check_decision_metrics(list(self.tc.decision_metrics), self.spec.task)  # mask mAP: segment only
        self.batch_size = int(self.tc.batch_size)
        self.accumulation = max(int(self.tc.accumulation_steps), 1)
        self.precision = setup_speed(self.tc, self.device, ctx.world_size)  # threads + train.amp by hardware
        self.amp_dtype = self.precision.dtype
        self.state = TrainState()
        self.partial_losses: dict = {"sums": {}, "count": 0}
        self.last_checkpoint_time = time.monotonic()
        self.callbacks: list[Callback] = (
            [HistoryLogger(self.exp)] if callbacks is None and ctx.is_main else list(callbacks or [])
        )
        self.wandb_id: str | None = None  # the W&B run a resumed run continues

        seed_everything(int(cfg.seed) + ctx.rank, bool(self.tc.deterministic))
        self.resume_checkpoint = load_run_checkpoint(self.exp.file("last")) if self.tc.resume else None
        self.excluded_images = on_main(ctx, self._run_doctor)
        self._build_data()
        negatives = on_main(ctx, self._check_negatives)
        self.negatives = negatives if ctx.is_main else []  # rank 0 measures them
        self._build_model()
        self._build_optimization()
        if self.tc.resume:
            self._resume()
        self.evaluator = Evaluator(
            cfg, ctx, self.spec, self.exp, self.postprocessor, self.datasets, self.eval_collate,
            self.negatives, self.amp_dtype,
        )  # fmt: skip
        if ctx.is_main:
            self._log_setup()

    @property
    def class_names(self) -> list[str]:
        return self.spec.class_names

    # ------------------------------------------------------------------ setup (checks; nothing written)

    def _run_doctor(self) -> list[str]:
        """The dataset doctor (it logs its own report and writes it to check.report_dir)."""
        from src.etl.check import check_dataset

        return check_dataset(self.cfg).excluded_images

    def _build_data(self) -> None:
        from src.dl.train.dataset import build_collate, build_datasets

        self.datasets = build_datasets(self.cfg, exclude=self.excluded_images, log=self.ctx.is_main)
        self.train_collate = build_collate(self.cfg, train=True)
        self.eval_collate = build_collate(self.cfg, train=False)
        if len(self.datasets["train"].image_paths) == 0:
            raise UserError(f"no training images: {Path(self.cfg.splits_dir) / 'train.csv'} lists none")

    def _check_negatives(self) -> list[Path]:
        """The held-out background images (train.negatives_path); an image also in train/val/test stops the
        run here (its FPPI would flatter the model)."""
        from src.dl.train.negatives import check_negatives_disjoint, split_image_paths

        negatives = check_negatives_disjoint(
            self.tc.negatives_path, split_image_paths(self.cfg), int(self.cfg.check.workers)
        )
        if negatives:
            logger.info(
                f"{len(negatives)} negatives in {self.tc.negatives_path}: FPPI and clean-image rate at every "
                "validation"
            )
        return negatives

    def _build_model(self) -> None:
        from src.models.denoising import set_denoising_negatives, set_denoising_queries

        self.spec = self.spec.with_arch_overrides(self._arch_overrides())
        losses = LossSettings(
            cls_loss=str(self.tc.cls_loss),
            bg_loss_weight=float(self.tc.bg_loss_weight),
            mask_loss=dict(self.tc.mask_loss),
        )
        self.model, criterion, self.postprocessor = build(self.spec, losses)
        # Parameters the size's own recipe freezes (the stem of l / x) stay frozen whatever we do later.
        self.trainable_backbone = [p for p in backbone_parameters(self.model) if p.requires_grad]
        if self.tc.pretrained_model_path and not self.tc.resume:
            from src.models import load_pretrained

            # It logs what it loaded, re-initialised (class heads) and copied from COCO rows.
            load_pretrained(self.model, str(self.tc.pretrained_model_path), class_names=self.class_names)
        elif self.ctx.is_main and not self.tc.resume:
            logger.info("training from scratch (train.pretrained_model_path is null)")
        self.model.to(self.device)
        apply_channels_last(self.model, self.precision)
        if (
            self.ctx.distributed
            and self.device.type == "cuda"
            and self.batch_size < int(self.tc.sync_bn_below)
        ):
            # Few images per GPU give noisy BatchNorm statistics: compute them over all GPUs instead.
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ema = (
            ModelEMA(self.model, float(self.tc.ema_decay), int(self.tc.ema_warmups))
            if self.tc.use_ema
            else None
        )
        # False-positive control (train.dn_negatives, bg_loss_weight, cls_loss); all off = the official loss.
        negatives = self.tc.dn_negatives
        set_denoising_queries(self.model, int(self.tc.num_denoising))
        set_denoising_negatives(self.model, int(negatives.num), float(negatives.iou_thresh))
        self.criterion = criterion.to(self.device)
        self.backbone_frozen = False
        self.ddp_model = self._wrap_ddp()

    def _arch_overrides(self) -> dict:
        """Architecture details a checkpoint fixes (decoder FFN width, LAB blocks, backbone BN kind): the
        released COCO files differ there from the size table, and the model must be built to fit them."""
        if self.tc.resume:
            return self.resume_checkpoint.spec.arch_overrides
        if not self.tc.pretrained_model_path:
            return {}
        from src.models import checkpoint_arch_overrides

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
        cap = self.tc.max_steps_per_epoch
        return min(batches, int(cap)) if cap else batches

    def _resume(self) -> None:
        """Load last.pt into every piece."""
        checkpoint, self.resume_checkpoint = self.resume_checkpoint, None  # free it once loaded
        training = checkpoint.training
        self.model.load_state_dict(checkpoint.model)
        if self.ema is not None and training["ema"] is not None:
            self.ema.load_state_dict(training["ema"])
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        if training["scaler"]:
            self.scaler.load_state_dict(training["scaler"])
        self.state = TrainState(**training["state"])
        rng_states = training["rng"] or []
        if len(rng_states) == self.ctx.world_size:
            set_rng_state(rng_states[self.ctx.rank])
            self.partial_losses = training["partial_losses"][self.ctx.rank]
        elif self.ctx.is_main:
            logger.warning(
                f"resume: last.pt was written by {len(rng_states)} process(es), now {self.ctx.world_size}: "
                "random streams start afresh (the run continues, not bit-for-bit)"
            )
        if self.ctx.is_main:
            logger.info(
                f"resuming {self.exp.file('last')}: epoch {self.state.epoch + 1}, batch {self.state.batch}, "
                f"optimizer step {self.state.global_step}/{self.total_steps}"
            )
        self.wandb_id = training.get("wandb_id")

    def _log_setup(self) -> None:
        base_lr, backbone_lr = train_lrs(self.cfg)
        n_params = sum(p.numel() for p in self.model.parameters())
        spec = self.spec
        one_class = f" (use_one_class: {len(spec.data_class_names)} data classes as one)" * spec.use_one_class
        logger.info(
            f"{spec.display_name}, {spec.num_classes} classes{one_class}, "
            f"{n_params / 1e6:.2f}M parameters, input {list(spec.img_size)}, device {self.device}, "
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

    def train_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        sampler = self._train_sampler(epoch)
        sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)
        # Worker seeds from this generator, not the global RNG: a resumed epoch gives its workers the same
        # seeds as the original one.
        generator = torch.Generator().manual_seed(
            int(self.cfg.seed) * 1_000_003 + epoch * 1009 + self.ctx.rank
        )
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=int(self.tc.num_workers),
            collate_fn=self.train_collate,
            pin_memory=self.device.type == "cuda",
            drop_last=sampler.per_rank >= self.batch_size,
            generator=generator,
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
        for epoch in range(self.state.epoch, epochs if not self.state.stopped_early else 0):
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
            self.state.stopped_early = (  # decided at a validation: the last epoch trained is judged
                bool(early_stop)
                and self.evaluator.validates(epoch)
                and self.state.epochs_without_improvement >= early_stop
            )
            self.save_last()
            self._call("on_epoch_end", row, self.state)
            if self.state.stopped_early:
                if self.ctx.is_main:
                    logger.info(
                        f"early stopping: no improvement for {early_stop} epoch(s) "
                        f"(best: epoch {self.state.best_epoch + 1})"
                    )
                break
        summary = self.final_evaluation()
        self.state.finished = True
        self.save_last()  # says "finished": a resume has nothing left to do
        summary.update(epochs_trained=self.state.epoch, stopped_early=self.state.stopped_early)
        return summary

    def _call(self, event: str, *args) -> None:
        if self.ctx.is_main:
            for callback in self.callbacks:
                getattr(callback, event)(*args)

    def _mean_over_ranks(self, values: dict) -> dict:
        per_rank = all_gather_objects(self.ctx, values)
        keys = list(dict.fromkeys(k for d in per_rank for k in d))
        return {k: sum(d.get(k, 0.0) for d in per_rank) / len(per_rank) for k in keys}

    def _save_debug_images(self) -> None:
        from src.dl.train.dataset import save_all_debug_images

        n = int(self.tc.debug_images)
        if n > 0:
            saved = save_all_debug_images(self.datasets, self.exp.root, n)
            logger.info(f"{len(saved)} processed samples drawn in {self.exp.file('debug_images')}")

    # ------------------------------------------------------------------ evaluation

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap_model(self.model)

    def validate(self, epoch: int) -> dict:
        """Evaluate the EMA weights on val; rank 0 judges the epoch (best.pt when it improved), every rank
        learns the verdict. An epoch train.eval_every skips: no metrics ({}), and early stopping counts it."""
        if not self.evaluator.validates(epoch):
            self.state.epochs_without_improvement += 1
            return {}
        model = self.eval_model()
        evaluation = self.evaluator.evaluate_split(model, "val", plots=False)
        verdict = None
        if self.ctx.is_main:
            negatives = self.evaluator.negatives_metrics(model, subsample=True)
            verdict = self.evaluator.judge_epoch(self.state, epoch, evaluation, negatives)
            if verdict["improved"]:
                self.save_best(verdict["metrics"], verdict["thresholds"], epoch + 1)
        verdict = broadcast_object(self.ctx, verdict)
        for key in (
            "best_score",
            "best_epoch",
            "epochs_without_improvement",
            "best_metrics",
            "best_thresholds",
        ):
            setattr(self.state, key, verdict[key])
        self.state.peak_score = verdict["peak_score"]
        return verdict["metrics"]

    def final_evaluation(self) -> dict:
        """best.pt (loaded from disk, as every later stage will) on val and test: metrics.csv, per_class.csv,
        thresholds.json (picked on val, also written into best.pt), plots/<split>/, eval_preds/<split>/; on
        the negatives folder (when there is one): the "negatives" row of metrics.csv."""
        barrier(self.ctx)
        best = load_run_checkpoint(self.exp.file("best"))
        model = build(best.spec).model
        model.load_state_dict(best.model)
        model.to(self.device).eval()
        results = {
            split: self.evaluator.evaluate_split(model, split, plots=True) for split in ("val", "test")
        }
        summary = {"exp_dir": str(self.exp.root), "best_epoch": self.state.best_epoch + 1}
        if self.ctx.is_main:
            negatives = self.evaluator.negatives_metrics(model)
            thresholds, metrics = self.evaluator.write_final_files(results, negatives)
            best.thresholds = thresholds
            best.metrics = metrics.get("val", best.metrics)
            save_run_checkpoint(self.exp.file("best"), best)
            final = metrics | ({"negatives": negatives} if negatives else {})
            self._call("on_final", final, self.state.global_step)
            summary.update(final, thresholds=thresholds)
        barrier(self.ctx)
        return broadcast_object(self.ctx, summary)

    # ------------------------------------------------------------------ checkpoints (src.models.checkpoint)

    def _run_config(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True)

    def save_last(self) -> None:
        """Write last.pt. Collective: every rank contributes its RNG state, rank 0 writes."""
        per_rank = all_gather_objects(self.ctx, (rng_state(), self.partial_losses))
        if self.ctx.is_main:
            wandb_ids = [c.run_id for c in self.callbacks if isinstance(c, WandbLogger)]
            training = {
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": dict(vars(self.state)),
                "epoch": self.state.epoch,
                "step": self.state.global_step,
                "rng": [rng for rng, _ in per_rank],
                "partial_losses": [losses for _, losses in per_rank],  # of the unfinished epoch
                "wandb_id": wandb_ids[0] if wandb_ids else self.wandb_id,
            }
            state = self.state
            checkpoint = RunCheckpoint(
                spec=self.spec, model=unwrap_model(self.model).state_dict(), config=self._run_config(),
                thresholds=state.best_thresholds, metrics=state.best_metrics, epoch=state.best_epoch + 1,
                training=training,
            )  # fmt: skip
            self._call("on_checkpoint", save_run_checkpoint(self.exp.file("last"), checkpoint))
        self.last_checkpoint_time = time.monotonic()

    def save_best(self, metrics: dict, thresholds: dict, epoch: int) -> None:
        """best.pt: the weights that are evaluated (EMA when on) + everything needed to use them (rank 0)."""
        checkpoint = RunCheckpoint(
            spec=self.spec, model=self.eval_model().state_dict(), config=self._run_config(),
            thresholds=thresholds, metrics=metrics, epoch=epoch,
        )  # fmt: skip
        self._call("on_checkpoint", save_run_checkpoint(self.exp.file("best"), checkpoint))
