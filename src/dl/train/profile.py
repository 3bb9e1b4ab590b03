"""Where the training loop's time goes: wall time per named section (benchmarks.train_speed --profile).

    timer = SectionTimer(device)
    with timer.section("forward"):
        outputs = model(images, targets)
    timer.totals  # {"forward": seconds, ...}; timer.counts: how often each section ran

The loop takes NO_TIMER unless it is profiled; its sections cost nothing then. On a GPU each section ends
with a synchronize so the time lands where the work is (profiling only).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class SectionTimer:
    def __init__(self, device: torch.device | None = None) -> None:
        self.sync = device is not None and device.type == "cuda"
        self.device = device
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


def time_calls(module: torch.nn.Module, timer: SectionTimer, name: str) -> None:
    """Every call of `module` also counts as section `name` (the criterion's matcher: it runs inside "loss",
    which therefore includes it)."""
    starts: list[float] = []

    def before(*_) -> None:
        starts.append(time.perf_counter())

    def after(*_) -> None:
        if timer.sync:
            torch.cuda.synchronize(timer.device)
        timer.add(name, time.perf_counter() - starts.pop())

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


class _NoTimer:
    """The loop's timer when nothing is profiled."""

    def section(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def add(self, name: str, seconds: float) -> None:
        pass


NO_TIMER = _NoTimer()
