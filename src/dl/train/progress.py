"""What the progress bar shows besides the loss: memory in use and time left."""

from __future__ import annotations

import os
import sys

import torch


def memory_used_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's current resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # /proc read, no subprocess: cheap enough for every progress-bar update
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        import resource  # noqa: PLC0415 (POSIX only; reached where /proc is missing)

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**30 if sys.platform == "darwin" else 2**20)


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
