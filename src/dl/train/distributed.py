"""Where this process sits in a (possibly single-process) run, and the few collective operations training
needs: torchrun's environment -> DistContext, barriers, objects broadcast from or gathered to rank 0."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from src.common.device import resolve_device


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


def mean_over_ranks(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks (a key missing on a rank counts 0 there)."""
    per_rank = all_gather_objects(ctx, values)
    keys = list(dict.fromkeys(k for d in per_rank for k in d))
    return {k: sum(d.get(k, 0.0) for d in per_rank) / len(per_rank) for k in keys}
