"""The inner loop of one training epoch, mixed into the Trainer: forward/backward with gradient accumulation
(DDP syncs only a window's last backward), the optimizer step (+ schedule, EMA), non-finite losses skipped
and counted, a progress bar, mid-epoch checkpoints and the abort test hook.

It uses the Trainer's model, ddp_model, criterion, optimizer, scheduler, scaler, ema, state, ctx and tc.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from loguru import logger
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.dl.train.core import TrainingAborted, TrainingDiverged, clip_and_step, compute_loss
from src.dl.train.optim import group_lrs
from src.dl.train.trainer_utils import any_rank, format_duration, memory_used_gb, sum_loss_kinds


class EpochLoop:
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
            images = images.to(self.device, non_blocking=True)  # (B, 3, H, W)
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
                f"The last good state is in {self.exp.file('last')} (continue with train.resume=true)."
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
            every_steps = int(self.tc.checkpoint_every_steps or 0)
            every_minutes = float(self.tc.checkpoint_every_minutes or 0)
            due = every_steps > 0 and self.state.global_step % every_steps == 0
            if every_minutes > 0:
                # Clocks differ between ranks: rank 0 decides for everyone (saving is collective).
                late = self.ctx.is_main and time.monotonic() - self.last_checkpoint_time >= every_minutes * 60
                due = any_rank(self.ctx, due or late)
            if due:
                self.save_last()
        abort_after = self.tc.abort_after_steps
        if abort_after and self.state.global_step >= int(abort_after):
            raise TrainingAborted(
                f"train.abort_after_steps={abort_after} reached (epoch {epoch + 1}, batch {self.state.batch})"
            )
