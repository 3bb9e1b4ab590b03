"""What this machine can do fast: native bf16, how many threads, how much memory and disk.

    precision = choose_precision(cfg.train.amp, device)   # Precision(dtype, channels_last, grad_scaler, reason)
    logger.info(precision.describe())                     # one line: which precision and why
    threads, why = resolve_threads(cfg.train.threads, cfg.train.num_workers)  # 1 on a loaded 2-core machine
    torch.set_num_threads(threads)                        # (None: OMP_NUM_THREADS is set, keep it)

Training precision follows the hardware: a CPU with native bf16 (AVX512-BF16 or AMX) runs bf16 autocast +
channels_last faster than fp32 with the same loss curve, while a CPU without it emulates bf16 in oneDNN and
runs slower than fp32 (docs/benchmarks.md). GPUs: bf16 where supported (Ampere+), else fp16 + GradScaler.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from src.common.errors import ConfigError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 instructions


@dataclass(frozen=True)
class Precision:
    """How the training step runs: autocast dtype (None = float32), memory format, loss scaling."""

    dtype: torch.dtype | None
    channels_last: bool
    grad_scaler: bool  # fp16 only: its small range needs the loss scaled
    reason: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> str:
        layout = " + channels_last" if self.channels_last else ""
        scaler = " + grad scaler" if self.grad_scaler else ""
        return f"precision {self.name}{layout}{scaler}: {self.reason}"


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The feature flags the (first) CPU reports; empty where /proc/cpuinfo does not exist (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_native_bf16(flags: set[str] | None = None) -> str | None:
    """The name of this CPU's native bf16 feature (amx_bf16 / avx512_bf16), or None if it only emulates bf16.

    /proc/cpuinfo first; elsewhere torch's own CPU probe (private API, hence guarded)."""
    flags = cpu_flags() if flags is None else flags
    for flag in NATIVE_BF16_FLAGS:
        if flag in flags:
            return flag
    if flags:
        return None
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for flag, probe in probes:
        if getattr(torch.cpu, probe, lambda: False)():
            return flag
    return None


def cuda_bf16(device: torch.device) -> bool:
    """True on GPUs with native bf16 (compute capability 8.0+: Ampere, Hopper...), not emulated bf16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _auto_precision(device: torch.device, native_bf16: str | None) -> Precision:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if cuda_bf16(device):
            return Precision(torch.bfloat16, True, False, f"amp=auto and {name} supports bf16")
        return Precision(torch.float16, False, True, f"amp=auto and {name} has no bf16 (fp16 instead)")
    if device.type == "cpu" and native_bf16:
        return Precision(
            torch.bfloat16, True, False, f"amp=auto and this CPU has native bf16 ({native_bf16})"
        )
    return Precision(None, False, False, f"amp=auto and this {device.type} has no native bf16 (fp32)")


def choose_precision(amp: str, device: torch.device, flags: set[str] | None = None) -> Precision:
    """train.amp on this device -> Precision. flags: the CPU's feature flags (None = read this CPU's).

    auto: bf16 + channels_last on a CPU with native bf16 or a bf16 GPU; fp16 + grad scaler on an older GPU;
    fp32 elsewhere. bf16 asked for where it is emulated runs, with a warning that it is slower.
    """
    amp = "off" if amp in (False, None) else str(amp).lower()  # YAML reads a bare `off` as false
    amp = "off" if amp == "fp32" else amp
    if amp not in AMP_CHOICES:
        raise ConfigError(f"train.amp must be one of {' | '.join(AMP_CHOICES)}, got {amp!r}")
    native_bf16 = cpu_native_bf16(flags) if device.type == "cpu" else None
    if amp == "off":
        return Precision(None, False, False, "amp=off")
    if amp == "auto":
        return _auto_precision(device, native_bf16)
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device; on CPU use train.amp=bf16, auto or off")
        return Precision(torch.float16, False, True, "amp=fp16")
    native = native_bf16 if device.type == "cpu" else device.type == "cuda" and cuda_bf16(device)
    if not native:
        logger.warning(
            f"train.amp=bf16: this {device.type} has no native bf16, so it is emulated and slower than fp32 "
            "(~1.8x on a CPU without AVX512-BF16/AMX); train.amp=auto picks the fastest precision"
        )
        return Precision(torch.bfloat16, False, False, "amp=bf16 (emulated: no native bf16 here)")
    return Precision(torch.bfloat16, True, False, "amp=bf16")


def apply_channels_last(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """NHWC weights where the precision asks for it (oneDNN / tensor-core convolutions run faster so)."""
    return model.to(memory_format=torch.channels_last) if precision.channels_last else model


# ---------------------------------------------------------------------------------------------- threads


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cpus() -> float:
    """CPUs other jobs keep busy: the 1-minute load average (0 where the OS does not report one). Read before
    this process starts its own threads, it is the other jobs' share."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0


# On a machine with up to this many CPUs the model step is the bottleneck and the loader workers need only a
# fraction of a core, so the step takes every core; above it the workers keep cores of their own.
SMALL_MACHINE_CPUS = 4


def resolve_threads(
    threads: int | None,
    num_workers: int,
    processes: int = 1,
    cpus: int | None = None,
    busy: float | None = None,
) -> tuple[int | None, str]:
    """torch intra-op threads for one training process and the reason, for the log.

    A number is taken as given. null: this process's share of the CPUs (all of them on a small machine, else
    minus its loader workers), capped by the CPUs the machine's load leaves free, at least 1: a start that
    training re-decides from measured throughput (src/dl/train/speed.py). None (leave torch's setting) when
    null and OMP_NUM_THREADS is set: the user (or torchrun) chose already.
    """
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"train.threads must be >= 1 or null (automatic), got {threads}")
        return int(threads), "train.threads"
    if cpus is None and os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    cpus = cpu_count() if cpus is None else cpus
    busy = busy_cpus() if busy is None else busy
    wanted = thread_share(num_workers, processes, cpus)
    free = max(int(cpus - round(busy)) // max(processes, 1), 1)
    return min(wanted, free), f"automatic: {cpus} CPU(s), load average {busy:.1f}"


def thread_share(num_workers: int, processes: int = 1, cpus: int | None = None) -> int:
    """The most torch threads one training process should use: its share of the CPUs (all of them on a
    small machine, else minus its loader workers), at least 1."""
    cpus = cpu_count() if cpus is None else cpus
    share = max(cpus // max(processes, 1), 1)
    return share if cpus <= SMALL_MACHINE_CPUS else max(share - int(num_workers), 1)


# ---------------------------------------------------------------------------------------------- memory, disk


def ram_available_bytes() -> int | None:
    """What can be allocated without swapping: MemAvailable from /proc/meminfo, capped by a container's
    cgroup-v2 limit (memory.max - memory.current) where there is one; None where unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_headroom(Path("/sys/fs/cgroup"))
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


def _cgroup_headroom(root: Path) -> int | None:
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its closest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024:
            return f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"
