"""One training epoch, as DETR's `train_one_epoch` but resumable mid-epoch: forward/backward with gradient
accumulation (DDP syncs only a window's last backward), the optimizer step (+ schedule, EMA), non-finite
losses skipped and counted, a progress bar, mid-epoch checkpoints and the abort test hook.

    runner = EpochRunner(model, criterion, optimization, ema, ctx, settings.step, amp_dtype, state, save_last)
    result = runner.run(forward_model, loader, epoch, n_batches, epochs)  # EpochResult: losses, images, seconds
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.dl.train.core import TrainingAborted, TrainingDiverged, TrainState, clip_and_step, compute_loss
from src.dl.train.distributed import DistContext, any_rank
from src.dl.train.ema import ModelEMA
from src.dl.train.history import sum_loss_kinds
from src.dl.train.optim import group_lrs
from src.dl.train.profile import NO_TIMER
from src.dl.train.progress import format_duration, memory_used_gb
from src.dl.train.settings import StepSettings


@dataclass
class Optimization:
    """What one optimizer step changes besides the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    total_steps: int  # over the whole run (the schedule ends there)
    clip_max_norm: float  # 0: no clipping


@dataclass
class EpochResult:
    losses: dict[str, float]  # mean of each loss kind over this rank's batches of the epoch
    images: int  # images this rank trained on in this call (a resumed epoch: from where it resumed)
    seconds: float  # wall time of those batches, data loading included

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class EpochRunner:
    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimization: Optimization,
        ema: ModelEMA | None,
        ctx: DistContext,
        settings: StepSettings,
        amp_dtype: torch.dtype | None,
        state: TrainState,
        save_checkpoint: Callable[[], None],
        channels_last: bool = False,
        timer=NO_TIMER,
    ) -> None:
        """model: the plain model (clipping and EMA read its parameters); the forward goes through the model
        `run` is given (DDP or compiled wrapper). state: the run's position, advanced here batch by batch.
        save_checkpoint: writes last.pt (collective under DDP). channels_last: images go to the device in
        the layout of the model's weights. timer: a profile.SectionTimer when profiled."""
        self.model, self.criterion, self.ema, self.ctx = model, criterion, ema, ctx
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.optimization, self.settings, self.amp_dtype = optimization, settings, amp_dtype
        self.state, self.save_checkpoint, self.timer = state, save_checkpoint, timer
        # Loss sums of this rank's batches so far; saved in last.pt so a resumed epoch's mean covers it all.
        self.partial_losses: dict = {"sums": {}, "count": 0}
        self.last_checkpoint_time = time.monotonic()

    def run(
        self, forward_model: nn.Module, loader: DataLoader, epoch: int, n_batches: int, epochs: int
    ) -> EpochResult:
        """Train `epoch` from batch state.batch to n_batches; `loader` starts at that batch."""
        start = self.state.batch
        if start == 0:
            self.partial_losses = {"sums": {}, "count": 0}
        self.last_checkpoint_time = time.monotonic()  # last.pt was written just before (or resumed from)
        sums: dict[str, float] = self.partial_losses["sums"]
        images_seen, bad_in_row = 0, 0
        started = time.perf_counter()
        bar = tqdm(
            total=n_batches, initial=start, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
            disable=not self.ctx.is_main, dynamic_ncols=True, leave=False,
        )  # fmt: skip
        for batch_index, (images, targets) in enumerate(self._device_batches(loader), start=start):
            if batch_index >= n_batches:
                break
            bad, loss, loss_dict = self._train_batch(forward_model, images, targets, batch_index, n_batches)
            if bad:
                bad_in_row = self._handle_bad_step(bad_in_row + 1, epoch, batch_index, loss_dict)
            else:
                bad_in_row = 0
                with self.timer.section("logging"):
                    for kind, value in sum_loss_kinds(loss_dict).items():
                        sums[kind] = sums.get(kind, 0.0) + value
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                self.partial_losses["count"] += 1
            images_seen += images.shape[0]
            self.state.batch = batch_index + 1
            if self._window_end(batch_index, n_batches):
                self._after_window(epoch, n_batches)
            with self.timer.section("logging"):
                bar.update(1)
                if self.ctx.is_main:
                    bar.set_postfix(
                        self._progress(sums, images_seen, started, start, epoch, epochs, n_batches)
                    )
        bar.close()
        self.optimization.optimizer.zero_grad(set_to_none=True)  # a window cut short leaves gradients
        counted = max(self.partial_losses["count"], 1)
        losses = {kind: total / counted for kind, total in sums.items()}
        return EpochResult(losses, images_seen, time.perf_counter() - started)

    def _window_end(self, batch_index: int, n_batches: int) -> bool:
        window_start = batch_index - batch_index % self.settings.accumulation
        return batch_index + 1 == min(window_start + self.settings.accumulation, n_batches)

    def _train_batch(self, forward_model, images, targets, batch_index: int, n_batches: int):
        """Forward, loss and backward of one batch; the optimizer step at a window's end.
        Returns (bad, loss, loss terms); bad: a non-finite loss or gradient (nothing applied)."""
        accumulation = self.settings.accumulation
        window_start = batch_index - batch_index % accumulation
        window_size = min(accumulation, n_batches - window_start)
        window_end = self._window_end(batch_index, n_batches)
        # Gradients of a window's earlier batches stay local; only its last backward all-reduces.
        skip_sync = self.ctx.distributed and not window_end
        with forward_model.no_sync() if skip_sync else contextlib.nullcontext():
            loss, loss_dict = compute_loss(
                forward_model, self.criterion, images, targets, self.amp_dtype, self.timer
            )
            bad = any_rank(self.ctx, not bool(torch.isfinite(loss)))
            if not bad:
                with self.timer.section("backward"):
                    self.optimization.scaler.scale(loss / window_size).backward()
        if not bad and window_end:
            bad = not self._optimizer_step()
        return bad, loss, loss_dict

    def _device_batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        batches = iter(loader)
        device = self.ctx.device
        while True:
            with self.timer.section("loader wait"):
                batch = next(batches, None)
            if batch is None:
                return
            with self.timer.section("host to device"):
                images, targets = batch
                layout = self.memory_format
                images = images.to(device, non_blocking=True, memory_format=layout)  # (B, 3, H, W)
                targets = [
                    {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                    for t in targets
                ]
            yield images, targets

    def _optimizer_step(self) -> bool:
        """One optimizer step (+ schedule, EMA); False when the gradients were not finite (step skipped)."""
        opt = self.optimization
        with self.timer.section("optimizer"):
            norm = clip_and_step(self.model, opt.optimizer, opt.scaler, opt.clip_max_norm)
            if not math.isfinite(norm) and not opt.scaler.is_enabled():
                return False
            self.state.global_step += 1
            # OneCycle covers steps 0 .. total_steps - 1; stepping past the end would raise the LR again.
            if self.state.global_step < opt.total_steps:
                opt.scheduler.step()
        if self.ema is not None:
            with self.timer.section("ema"):
                self.ema.update(self.model)
        return True

    def _handle_bad_step(self, bad_in_row: int, epoch: int, batch_index: int, loss_dict: dict) -> int:
        """A non-finite loss or gradient: drop the window's gradients, stop after max_bad_steps in a row."""
        self.optimization.optimizer.zero_grad(set_to_none=True)
        bad_terms = [k for k, v in loss_dict.items() if not torch.isfinite(v).all()]
        if self.ctx.is_main:
            where = ", ".join(bad_terms) if bad_terms else "gradients or another rank's loss"
            logger.warning(
                f"non-finite values at epoch {epoch + 1}, batch {batch_index + 1} ({where}): step skipped"
            )
        limit = self.settings.max_bad_steps
        if bad_in_row >= limit:
            raise TrainingDiverged(
                f"{bad_in_row} non-finite losses/gradients in a row (train.max_bad_steps={limit}); "
                "training stopped. Usual causes: a learning rate too high (lower train.lrs), fp16 overflow "
                "(use train.amp=bf16 or off), or broken labels (run `make check`). The last good state is "
                "in the experiment's last.pt (continue with train.resume=true)."
            )
        return bad_in_row

    def _progress(self, sums, images_seen, started, start, epoch, epochs, n_batches) -> dict:
        elapsed = max(time.perf_counter() - started, 1e-9)
        done = max(self.state.batch - start, 1)
        remaining = (n_batches - self.state.batch) + (epochs - epoch - 1) * n_batches
        lrs = group_lrs(self.optimization.optimizer)
        return {
            "loss": f"{sums.get('loss', math.nan) / max(self.partial_losses['count'], 1):.3f}",
            "lr": f"{lrs.get('lr_rest', next(iter(lrs.values()))):.2e}",
            "img/s": f"{images_seen * self.ctx.world_size / elapsed:.1f}",
            "eta": format_duration(remaining * elapsed / done),  # the whole run, without validation
            "mem": f"{memory_used_gb(self.ctx.device):.2f}G",
        }

    def _after_window(self, epoch: int, n_batches: int) -> None:
        """Mid-epoch checkpoint when due, then the abort test hook."""
        settings = self.settings
        if self.state.batch < n_batches:  # the end-of-epoch checkpoint comes right after validation
            every_steps, every_minutes = settings.checkpoint_every_steps, settings.checkpoint_every_minutes
            due = every_steps > 0 and self.state.global_step % every_steps == 0
            if every_minutes > 0:
                # Clocks differ between ranks: rank 0 decides for everyone (saving is collective).
                late = self.ctx.is_main and time.monotonic() - self.last_checkpoint_time >= every_minutes * 60
                due = any_rank(self.ctx, due or late)
            if due:
                with self.timer.section("checkpoint"):
                    self.save_checkpoint()
                self.last_checkpoint_time = time.monotonic()
        abort_after = settings.abort_after_steps
        if abort_after and self.state.global_step >= abort_after:
            raise TrainingAborted(
                f"train.abort_after_steps={abort_after} reached (epoch {epoch + 1}, batch {self.state.batch})"
            )
