"""The few collectives training needs when several processes train one dictionary (Lightning's DDP strategy).

Each function is the identity in a single process, so callers need no special case. Each takes and returns
tensors on the caller's device, and runs the collective on the device the process group's backend needs (NCCL:
the process's CUDA device; gloo: the CPU): after ``trainer.fit`` Lightning has moved the module to the CPU, and the
final checkpoint still gathers every process's state through NCCL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def collective_device() -> torch.device:
    """Where the process group's backend takes tensors: this process's CUDA device for NCCL, else the CPU."""
    if world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process (a new tensor)."""
    if world_size() == 1:
        return t.clone()
    summed = t.to(collective_device(), copy=True)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(t.device)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` (same shape on each) concatenated along dim 0, in rank order."""
    if world_size() == 1:
        return x
    local = x.to(collective_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(x.device)


def gather_batches(x: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """Every process's ``x``, whose rows are consecutive batches of ``batch_rows``, gathered batch by batch (batch 0
    of rank 0, of rank 1, ..., then batch 1): the order one process that had the whole batches would hold them in."""
    gathered = gather_rows(x)
    if world_size() == 1:
        return gathered
    return gathered.view(world_size(), -1, batch_rows, x.shape[-1]).transpose(0, 1).reshape(-1, x.shape[-1])


def gather_objects(obj: Any) -> list[Any]:
    """Every process's (picklable) ``obj``, in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values."""
    if world_size() == 1:
        return
    device = collective_device()
    for t in tensors:
        if t.device == device:
            dist.broadcast(t.data, src=src)
        else:
            carried = t.data.to(device)
            dist.broadcast(carried, src=src)
            t.data.copy_(carried)


def broadcast_from_lead(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every process, whatever its length there (dim 0 may differ; the other dims and the dtype
    must agree): what only rank 0 computed (a resampling plan) reaches every process."""
    if world_size() == 1:
        return t
    device = collective_device()
    length = torch.tensor([len(t)], device=device)
    dist.broadcast(length, src=0)
    out = (
        t.to(device).contiguous()
        if rank() == 0
        else torch.empty(int(length), *t.shape[1:], dtype=t.dtype, device=device)
    )
    dist.broadcast(out, src=0)
    return out.to(t.device)


def lead_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then on the others once it has finished: for work that builds something shared
    on disk (a token store, an activation cache) that ``fn`` opens when it is already there, so exactly one process
    builds it and no rename races. A failure on rank 0 stops every rank (none waits forever, none builds it
    itself). The others wait in a collective, under the process group's timeout (Lightning's
    ``DDPStrategy(timeout=...)``; 30 minutes by default)."""
    if world_size() == 1:
        return fn()
    failed: list[Any] = [None]
    if rank() == 0:
        try:
            result = fn()
        except BaseException as err:
            failed[0] = f"{type(err).__name__}: {err}"
            dist.broadcast_object_list(failed, src=0)
            raise
    dist.broadcast_object_list(failed, src=0)
    if failed[0] is not None:
        raise RuntimeError(f"rank 0 failed to prepare shared data ({failed[0]})")
    return result if rank() == 0 else fn()
