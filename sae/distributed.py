"""The few collectives training needs when several processes train one dictionary (Lightning's DDP strategy).

Each function is the identity in a single process, so callers need no special case.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process (a new tensor)."""
    t = t.clone()
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` (same shape on each) concatenated along dim 0, in rank order."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


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
    if world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src=src)
