"""How fast training runs on this machine: torch threads (chosen at start, re-decided at every epoch
boundary from the throughput each count measured), the precision train.amp picks, and train.compile.

    precision, tuner = setup_speed(settings.threads, settings.num_workers, settings.amp, device, processes)
    ...after each epoch: tuner.after_epoch(epoch, result.images_per_s)  # may change torch's threads, logs it
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from loguru import logger
from torch import nn

from src.common.hardware import Precision, choose_precision, resolve_threads, thread_share

# A count that measured better is only taken when it beats the current one by this share: epoch-to-epoch
# noise (augmentation, a shared machine) must not flip the count back and forth.
MIN_GAIN = 0.05
# Epochs before a neighbouring count is measured again (the load may have changed); doubled each time the
# re-measurement confirms the current count, back to this after a change.
RECHECK_EPOCHS = 3


def thread_ladder(most: int) -> list[int]:
    """The counts worth trying up to `most`: most, most/2, most/4 ... 1 (ascending)."""
    counts, n = set(), max(int(most), 1)
    while n >= 1:
        counts.add(n)
        n //= 2
    return sorted(counts)


class ThreadTuner:
    """Re-decides torch's intra-op thread count at epoch boundaries from measured training throughput.

    It keeps the img/s each count last measured and the epoch it did. After each epoch it moves to the best
    measured count (by more than MIN_GAIN); a neighbouring count on the ladder that was never measured, or
    not for a while, gets one epoch to measure itself. set_threads and the throughput are injected, so a fake
    source can drive it."""

    def __init__(self, start: int, most: int, set_threads: Callable[[int], None] = torch.set_num_threads):
        self.counts = sorted(set(thread_ladder(most)) | {int(start)})
        self.current, self.set_threads = int(start), set_threads
        self.rates: dict[int, tuple[float, int]] = {}  # threads -> (img/s, epoch it was measured)
        self.recheck = RECHECK_EPOCHS
        self.trial_from: int | None = None  # the count a trial epoch left (it returns there if no better)
        self.warmed_up = False

    def after_epoch(self, epoch: int, images_per_s: float) -> int | None:
        """Record the epoch's throughput at the current count; returns the new count when it changes.
        The first epoch is not compared: it also pays one-off costs (kernel selection, caches)."""
        if not self.warmed_up:
            self.warmed_up = True
            return None
        self.rates[self.current] = (float(images_per_s), epoch)
        choice, why = self._decide(epoch)
        if choice == self.current:
            if why:  # a trial epoch's count won: it stays
                logger.info(f"torch threads {choice} kept: {why}")
            return None
        logger.info(f"torch threads {self.current} -> {choice}: {why}")
        self.current = choice
        self.set_threads(choice)
        return choice

    def _decide(self, epoch: int) -> tuple[int, str]:
        if self.trial_from is not None:  # a trial epoch just ended: keep the better of the two
            return self._after_trial(epoch)
        stale = [n for n in self._neighbours() if self._age(n, epoch) > self.recheck]
        if stale:
            self.trial_from = self.current
            rate = self.rates[self.current][0]
            return stale[0], f"measuring it for one epoch ({self.current} thread(s): {rate:.2f} img/s)"
        return self.current, ""

    def _after_trial(self, epoch: int) -> tuple[int, str]:
        trial, previous = self.current, self.trial_from
        self.trial_from = None
        trial_rate, previous_rate = self.rates[trial][0], self.rates[previous][0]
        if trial_rate > previous_rate * (1 + MIN_GAIN):
            self.recheck = RECHECK_EPOCHS
            return trial, f"{trial_rate:.2f} img/s against {previous_rate:.2f} at {previous} thread(s)"
        self.recheck = 2 * self.recheck  # confirmed: look again less often
        return previous, f"{previous_rate:.2f} img/s against {trial_rate:.2f} at {trial} thread(s)"

    def _neighbours(self) -> list[int]:
        at = self.counts.index(self.current)
        return [self.counts[i] for i in (at + 1, at - 1) if 0 <= i < len(self.counts)]

    def _age(self, threads: int, epoch: int) -> float:
        return epoch - self.rates[threads][1] if threads in self.rates else float("inf")


def setup_speed(
    threads: int | None, num_workers: int, amp: str, device: torch.device, processes: int = 1
) -> tuple[Precision, ThreadTuner | None]:
    """Set torch's intra-op threads (train.threads) and choose the precision (train.amp) for this machine;
    logs both in one line each. Returns the precision and, when the thread count is automatic (train.threads
    null, no OMP_NUM_THREADS, one process per machine, a CPU device), the tuner that re-decides it."""
    chosen, how = resolve_threads(threads, num_workers, processes)
    if chosen is not None:
        torch.set_num_threads(chosen)
    tuner = None
    most = thread_share(num_workers, processes)
    if threads is None and chosen is not None and processes == 1 and device.type == "cpu" and most > 1:
        tuner = ThreadTuner(chosen, most)
        how += f"; re-decided each epoch from the measured img/s (1..{most})"
    logger.info(f"{torch.get_num_threads()} torch thread(s) ({how}), {num_workers} loader worker(s)")
    precision = choose_precision(amp, device)
    logger.info(precision.describe())
    return precision, tuner


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(model) when train.compile is on; eager with one warning when compiling is impossible.

    torch.compile is lazy: most failures surface at the first call, so the wrapper also falls back there."""
    if not enabled:
        return model
    try:
        compiled = torch.compile(model, dynamic=True)
    except Exception as err:  # noqa: BLE001 - any compiler problem: train eagerly instead
        logger.warning(f"train.compile: torch.compile is not available here ({err}); training eagerly")
        return model
    return _EagerFallback(compiled, model)


class _EagerFallback(nn.Module):
    """Calls the compiled model; on its first failure warns once and uses the eager model from then on."""

    def __init__(self, compiled: nn.Module, eager: nn.Module) -> None:
        super().__init__()
        self.eager = eager
        self._compiled = [compiled]  # in a list: not registered as a second copy of the parameters
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                return self._compiled[0](*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - compile errors come in many types
                self.failed = True
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                logger.warning(f"train.compile: torch.compile failed ({message}); training eagerly")
        return self.eager(*args, **kwargs)
