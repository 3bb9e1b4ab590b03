"""Small pieces of the trainer that are not the training loop itself.

Distributed setup (torchrun), seeding and RNG snapshots (exact resume), mixed precision settings, samplers
that resume mid-epoch and evaluate every image exactly once, memory readings, and the history/curves files.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from loguru import logger
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Sampler

from src.common.device import resolve_device
from src.common.hardware import Precision, choose_precision, resolve_threads

# ---------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (nccl on GPU, gloo on CPU).

    Launched without torchrun this is a plain single-process context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if not dist.is_initialized():
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
            dist.init_process_group("nccl", device_id=torch_device, timeout=timedelta(minutes=60))
        else:
            dist.init_process_group("gloo", timeout=timedelta(minutes=60))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj=None):
    """Rank 0's `obj` on every rank (decisions such as 'stop now' must be identical everywhere)."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_objects(ctx: DistContext, obj) -> list:
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True if `flag` is true on any rank (cheap all-reduce of one number)."""
    if not ctx.distributed:
        return bool(flag)
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


# ---------------------------------------------------------------------------------------------- seeds and RNG


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # warn_only: a few ops (e.g. grid_sample backward on CUDA) have no deterministic kernel.
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict:
    """Every random stream of this process, in types `torch.load(weights_only=True)` accepts (so a last.pt
    stays loadable as plain weights, e.g. as train.pretrained_model_path)."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _as_tuples(value):
    """random.setstate needs tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------- mixed precision


def setup_speed(tc: DictConfig, device: torch.device, processes: int = 1) -> Precision:
    """Set torch's intra-op threads (train.threads) and choose the precision (train.amp) for this machine;
    logs both in one line each. Called once per process before the model is built."""
    threads, how = resolve_threads(tc.threads, int(tc.num_workers), processes)
    if threads is not None:
        torch.set_num_threads(threads)
    logger.info(f"{torch.get_num_threads()} torch thread(s) ({how}), {int(tc.num_workers)} loader worker(s)")
    precision = choose_precision(str(tc.amp), device)
    logger.info(precision.describe())
    return precision


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


def to_float32(obj):
    """Cast every floating tensor in nested dicts/lists to float32 (the loss is computed outside autocast)."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {key: to_float32(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(value) for value in obj)
    return obj


# ---------------------------------------------------------------------------------------------- samplers


class EpochShuffleSampler(Sampler[int]):
    """This rank's share of a shuffled epoch, reproducible from (seed, epoch), able to start mid-epoch.

    Every rank draws the same permutation (seeded by seed + epoch) and takes every world_size-th index, padded
    by wrapping around so ranks see equally many samples (DDP needs equal step counts). `skip` drops the first
    samples of this rank's share: a run resumed after k batches continues with batch k + 1.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the training split is empty")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle = shuffle
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.num_samples))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self.skip :])

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)


class ShardSampler(Sampler[int]):
    """Evaluation split across ranks without padding: every image is seen exactly once in total."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------------- resources


def memory_used_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's current resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # /proc read, no subprocess: cheap enough for every progress-bar update
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**30 if sys.platform == "darwin" else 2**20)


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


# ---------------------------------------------------------------------------------------------- losses and history

# The criterion reports every term per decoder layer (loss_vfl_aux_0, loss_bbox_dn_1, loss_giou_enc_0,
# loss_fgl_pre ...). History keeps one column per kind: the sum over layers, which is what is optimised.
_LAYER_SUFFIX = re.compile(r"_(aux|dn|enc|pre)(_\w+)?$")


def loss_kind(term: str) -> str:
    return _LAYER_SUFFIX.sub("", term)


def sum_loss_kinds(loss_dict: dict[str, float]) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for term, value in loss_dict.items():
        kinds[loss_kind(term)] = kinds.get(loss_kind(term), 0.0) + float(
            value.detach() if torch.is_tensor(value) else value
        )
    return kinds


def plot_curves(history: Sequence[dict], path: Path, metric_names: Sequence[str]) -> None:
    """curves.png: loss terms, validation metrics and learning rates per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from src.common.io import atomic_write

    if not history:
        return
    panels = {
        "loss (train, per batch)": [k for k in history[-1] if k == "loss" or k.startswith("loss_")],
        "validation metrics": [k for k in metric_names if any(k in row for row in history)],
        "learning rate": [k for k in history[-1] if k.startswith("lr_")],
    }
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (title, keys) in zip(axes, panels.items()):
        for key in keys:
            # Epochs without a value (not validated: train.eval_every) are left out, not drawn as gaps.
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            ax.plot(*zip(*points), marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_history(history: Sequence[dict], path: Path) -> None:
    import pandas as pd

    from src.common.io import atomic_write_csv

    frame = pd.DataFrame(list(history))  # an epoch without validation (train.eval_every): empty metric cells
    # Columns in first-seen order, the epoch's total time last (a first epoch without validation would put it
    # before the metric columns).
    columns = [c for c in frame.columns if c != "epoch_time_s"] + ["epoch_time_s"] * ("epoch_time_s" in frame)
    atomic_write_csv(path, frame[columns])


def remove_sink_safely(sink_id: int | None) -> None:
    if sink_id is None:
        return
    with contextlib.suppress(ValueError):  # already removed
        logger.remove(sink_id)
