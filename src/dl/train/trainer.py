"""The Trainer: the epochs of a run (train, validate the EMA weights, checkpoint), then the final evaluation of
best.pt on val and test. Built by composition: every part comes in through the constructor, made by
src/dl/train/setup.py from the config; the Trainer itself reads no config.

    trainer = Trainer(settings, ctx, exp, spec, data, parts, optimization, precision, events, run_config)
    summary = trainer.fit()

Resume is exact: last.pt holds the model, EMA, optimizer, scheduler, grad scaler, the position (epoch and
batch), early-stopping state, history and every rank's RNG state (`resume_from`). It is written at the end
of each epoch and also mid-epoch (train.checkpoint_every_steps / _minutes), always atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader

from src.common.experiment import Experiment
from src.common.hardware import Precision
from src.dl.train.core import TrainState
from src.dl.train.dataset import save_all_debug_images
from src.dl.train.distributed import (
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_object,
    mean_over_ranks,
)
from src.dl.train.ema import ModelEMA, unwrap_model
from src.dl.train.epoch import EpochResult, EpochRunner, Optimization
from src.dl.train.evaluation import Evaluator
from src.dl.train.events import Events
from src.dl.train.optim import group_lrs
from src.dl.train.profile import NO_TIMER
from src.dl.train.rng import rng_state, set_rng_state
from src.dl.train.samplers import EpochShuffleSampler
from src.dl.train.settings import TrainSettings
from src.dl.train.speed import ThreadTuner, maybe_compile
from src.models.build import build
from src.models.checkpoint import RunCheckpoint, load_run_checkpoint, save_run_checkpoint
from src.models.spec import ModelSpec


@dataclass
class TrainData:
    datasets: dict  # "train", "val"[, "test"]: src.dl.train.dataset.DetectionDataset
    train_collate: Callable  # batches of the training loader (multiscale when on)
    eval_collate: Callable
    negatives: list[Path]  # held-out background images, checked disjoint from the splits ([]: none)


@dataclass
class ModelParts:
    model: nn.Module  # the plain model on its device (DDP and compile wrap it for the forward only)
    criterion: nn.Module
    postprocessor: nn.Module
    ema: ModelEMA | None
    trainable_backbone: list[
        nn.Parameter
    ]  # what freezing the backbone freezes (the recipe's own stay frozen)


def batches_in_epoch(dataset, epoch: int, batch_size: int, cap: int | None, ctx: DistContext) -> int:
    """Batches this rank trains in `epoch` (the train set shrinks while background images are ignored)."""
    per_rank = epoch_sampler(dataset, epoch, 0, ctx).per_rank
    batches = per_rank // batch_size if per_rank >= batch_size else 1
    return min(batches, cap) if cap else batches


def epoch_sampler(dataset, epoch: int, seed: int, ctx: DistContext) -> EpochShuffleSampler:
    dataset.set_epoch(epoch)  # mosaic/mixup windows, no-aug epochs, background-ignoring follow the epoch
    if len(dataset) == 0:
        raise ValueError(
            f"epoch {epoch + 1}: no training image has a box, and train.ignore_background_epochs leaves "
            "background images out; lower it or add labels"
        )
    return EpochShuffleSampler(len(dataset), seed, ctx.rank, ctx.world_size)


class Trainer:
    def __init__(
        self,
        settings: TrainSettings,
        ctx: DistContext,
        exp: Experiment,
        spec: ModelSpec,
        data: TrainData,
        parts: ModelParts,
        optimization: Optimization,
        precision: Precision,
        events: Events,
        run_config: dict,
        tuner: ThreadTuner | None = None,
        timer=NO_TIMER,
    ) -> None:
        """run_config: the run's resolved config, saved in every checkpoint; events: fired on rank 0;
        tuner: re-decides torch's threads after each epoch (None: fixed); timer: profile.SectionTimer."""
        self.settings, self.ctx, self.device, self.exp, self.spec = settings, ctx, ctx.device, exp, spec
        self.data, self.parts, self.optimization, self.precision = data, parts, optimization, precision
        self.events, self.run_config, self.tuner, self.timer = events, run_config, tuner, timer
        self.model, self.ema = parts.model, parts.ema
        self.state = TrainState()
        self.backbone_frozen = False
        self.forward_model = self._wrap_model()
        self.runner = EpochRunner(
            parts.model, parts.criterion, optimization, parts.ema, ctx, settings.step, precision.dtype,
            self.state, self.save_last, precision.channels_last, timer,
        )  # fmt: skip
        self.evaluator = Evaluator(
            settings.evaluation, ctx, spec, exp, parts.postprocessor, data.datasets, data.eval_collate,
            data.negatives, precision.dtype,
        )  # fmt: skip

    # ------------------------------------------------------------------ model wrappers and freezing

    def _wrap_model(self) -> nn.Module:
        """DDP over the plain model; re-done when the backbone is (un)frozen, as DDP fixes its parameter set."""
        if not self.ctx.distributed:
            return maybe_compile(self.model, self.settings.compile)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a batch without any box (background-only) has no denoising queries, so the
        # denoising embedding gets no gradient in that step.
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=device_ids, find_unused_parameters=True
        )

    def set_backbone_frozen(self, frozen: bool) -> None:
        if frozen == self.backbone_frozen:
            return
        for param in self.parts.trainable_backbone:
            param.requires_grad_(not frozen)
        self.backbone_frozen = frozen
        if self.ctx.distributed:
            self.forward_model = self._wrap_model()
        if self.ctx.is_main:
            logger.info("backbone frozen" if frozen else "backbone unfrozen")

    def _train_mode(self) -> None:
        self.forward_model.train()
        self.parts.criterion.train()
        if self.backbone_frozen:
            # A frozen backbone keeps its BatchNorm statistics too (they would drift on the new data).
            unwrap_model(self.model).backbone.eval()

    # ------------------------------------------------------------------ data

    def batches_in_epoch(self, epoch: int) -> int:
        step = self.settings.step
        return batches_in_epoch(
            self.data.datasets["train"], epoch, step.batch_size, step.max_steps_per_epoch, self.ctx
        )

    def train_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        dataset, seed = self.data.datasets["train"], self.settings.seed
        sampler = epoch_sampler(dataset, epoch, seed, self.ctx)
        collate = self.data.train_collate
        if hasattr(collate, "set_epoch"):
            collate.set_epoch(epoch)  # multiscale stops in the no-aug epochs
        batch_size = self.settings.step.batch_size
        sampler.set_epoch(epoch, skip=skip_batches * batch_size)
        # Worker seeds from this generator, not the global RNG: a resumed epoch gives its workers the same
        # seeds as the original one.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + self.ctx.rank)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.settings.num_workers,
            collate_fn=collate, pin_memory=self.device.type == "cuda",
            drop_last=sampler.per_rank >= batch_size, generator=generator,
        )  # fmt: skip

    # ------------------------------------------------------------------ epochs

    def fit(self) -> dict:
        """Train the remaining epochs, then evaluate best.pt on val and test; returns the run summary."""
        settings = self.settings
        self._fire("on_train_start", self.state)
        if self.state.epoch == 0 and self.state.batch == 0 and self.ctx.is_main:
            self._save_debug_images()
        for epoch in range(self.state.epoch, settings.epochs if not self.state.stopped_early else 0):
            self.train_epoch(epoch)
            if self.state.stopped_early:
                if self.ctx.is_main:
                    logger.info(
                        f"early stopping: no improvement for {settings.early_stopping} epoch(s) "
                        f"(best: epoch {self.state.best_epoch + 1})"
                    )
                break
        summary = self.final_evaluation()
        self.state.finished = True
        self.save_last()  # says "finished": a resume has nothing left to do
        summary.update(epochs_trained=self.state.epoch, stopped_early=self.state.stopped_early)
        return summary

    def train_batches(self, epoch: int, n_batches: int | None = None) -> EpochResult:
        """The training half of an epoch, from where the state stands (a resumed epoch: its next batch) to
        batch n_batches (None: the epoch's end)."""
        self.state.epoch = epoch
        self.set_backbone_frozen(epoch < self.settings.freeze_backbone_epochs)
        n_batches = self.batches_in_epoch(epoch) if n_batches is None else n_batches
        loader = self.train_loader(epoch, self.state.batch)
        self._train_mode()
        return self.runner.run(self.forward_model, loader, epoch, n_batches, self.settings.epochs)

    def train_epoch(self, epoch: int) -> dict:
        """Train, validate and checkpoint one epoch; returns its history row."""
        self._fire("on_epoch_start", epoch)
        started = time.perf_counter()
        result = self.train_batches(epoch)
        row = {"epoch": epoch + 1, **mean_over_ranks(self.ctx, result.losses)}
        row |= group_lrs(self.optimization.optimizer)
        row["train_time_s"] = round(time.perf_counter() - started, 2)
        with self.timer.section("validation"):
            row.update(self.validate(epoch))
        row["epoch_time_s"] = round(time.perf_counter() - started, 2)
        self.state.history.append(row)
        self.state.epoch, self.state.batch = epoch + 1, 0
        early_stop = self.settings.early_stopping
        self.state.stopped_early = (  # decided at a validation: the last epoch trained is judged
            bool(early_stop)
            and self.evaluator.validates(epoch)
            and self.state.epochs_without_improvement >= early_stop
        )
        with self.timer.section("checkpoint"):
            self.save_last()
        with self.timer.section("logging"):
            self._fire("on_epoch_end", row, self.state)
        if self.tuner is not None and epoch + 1 < self.settings.epochs:  # a next epoch to use it
            self.tuner.after_epoch(epoch, result.images_per_s)
        return row

    def _fire(self, event: str, *args) -> None:
        if self.ctx.is_main:
            self.events.fire(event, *args)

    def _save_debug_images(self) -> None:

        n = self.settings.debug_images
        if n > 0:
            self.data.datasets["train"].set_epoch(0)
            saved = save_all_debug_images(self.data.datasets, self.exp.root, n)
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
        self._fire("on_eval_end", verdict["metrics"], self.state)
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
            self._fire("on_train_end", final, self.state.global_step)
            summary.update(final, thresholds=thresholds)
        barrier(self.ctx)
        return broadcast_object(self.ctx, summary)

    # ------------------------------------------------------------------ checkpoints (src.models.checkpoint)

    def save_last(self) -> None:
        """Write last.pt. Collective: every rank contributes its RNG state, rank 0 writes."""
        per_rank = all_gather_objects(self.ctx, (rng_state(), self.runner.partial_losses))
        if not self.ctx.is_main:
            return
        opt = self.optimization
        training = {
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "state": dict(vars(self.state)),
            "epoch": self.state.epoch,
            "step": self.state.global_step,
            "rng": [rng for rng, _ in per_rank],
            "partial_losses": [losses for _, losses in per_rank],  # of the unfinished epoch
        }
        self._fire("on_save_state", training)
        state = self.state
        checkpoint = RunCheckpoint(
            spec=self.spec, model=unwrap_model(self.model).state_dict(), config=self.run_config,
            thresholds=state.best_thresholds, metrics=state.best_metrics, epoch=state.best_epoch + 1,
            training=training,
        )  # fmt: skip
        self._fire("on_checkpoint", save_run_checkpoint(self.exp.file("last"), checkpoint))

    def save_best(self, metrics: dict, thresholds: dict, epoch: int) -> None:
        """best.pt: the weights that are evaluated (EMA when on) + everything needed to use them (rank 0)."""
        checkpoint = RunCheckpoint(
            spec=self.spec, model=self.eval_model().state_dict(), config=self.run_config,
            thresholds=thresholds, metrics=metrics, epoch=epoch,
        )  # fmt: skip
        self._fire("on_checkpoint", save_run_checkpoint(self.exp.file("best"), checkpoint))

    def resume_from(self, training: dict, model_state: dict) -> None:
        """Load last.pt's weights and training state into every part."""
        self.model.load_state_dict(model_state)
        if self.ema is not None and training["ema"] is not None:
            self.ema.load_state_dict(training["ema"])
        opt = self.optimization
        opt.optimizer.load_state_dict(training["optimizer"])
        opt.scheduler.load_state_dict(training["scheduler"])
        if training["scaler"]:
            opt.scaler.load_state_dict(training["scaler"])
        for key, value in training["state"].items():
            setattr(self.state, key, value)  # the runner holds the same TrainState
        rng_states = training["rng"] or []
        if len(rng_states) == self.ctx.world_size:
            set_rng_state(rng_states[self.ctx.rank])
            self.runner.partial_losses = training["partial_losses"][self.ctx.rank]
        elif self.ctx.is_main:
            logger.warning(
                f"resume: last.pt was written by {len(rng_states)} process(es), now {self.ctx.world_size}: "
                "random streams start afresh (the run continues, not bit-for-bit)"
            )
        if self.ctx.is_main:
            logger.info(
                f"resuming {self.exp.file('last')}: epoch {self.state.epoch + 1}, batch {self.state.batch}, "
                f"optimizer step {self.state.global_step}/{opt.total_steps}"
            )
