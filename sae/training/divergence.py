"""Divergence, watched on the device: a loss that stops being finite, or a training FVU that stays far above 1.

A run whose loss became NaN must stop, and so must one that diverged without a NaN (``train.lr`` far too high
gives a finite FVU of 10^5): its dictionary is worse than predicting the mean. But asking the device about every
step stalls a GPU (each ``if`` on a device tensor waits for all queued work). So each step only records, in a few
device tensors, whether and when each dictionary diverged (``DivergenceWatch.observe``); the optimiser skips a
step whose gradients are not finite (``skip_non_finite_step``: fused Adam's ``found_inf``, as AMP's grad scaler
does it), so no NaN reaches the weights or Adam's moments; and the host reads the record every few steps and once
training ends (``DivergenceWatch.earliest``). Every process reads the records of all processes, so a NaN on one
rank stops every rank at the same step instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sae.distributed import gather_rows

NON_FINITE, FVU_HIGH = 1, 2  # why a dictionary counts as diverged (0: it has not)


@dataclass(frozen=True)
class Divergence:
    """The first divergence any process saw: which member of the set, at which step (optimiser steps done), why
    (``NON_FINITE`` or ``FVU_HIGH``) and the loss or FVU then."""

    member: int
    step: int
    reason: int
    value: float


class DivergenceWatch(nn.Module):
    """Per dictionary of a set: the step it first diverged at (-1: never), why, and the value then.

    ``fvu_limit``/``window``: a dictionary whose training FVU stays above ``fvu_limit`` for ``window`` steps in a row
    has diverged (``None``: only a non-finite loss counts). Not saved in checkpoints (a resumed run starts a fresh
    window), but moved with the module, so the record lives on the training device.
    """

    def __init__(self, members: int, fvu_limit: float | None, window: int | None):
        super().__init__()
        self.fvu_limit, self.window = fvu_limit, window
        for name, value in (("streak", 0), ("first_step", -1), ("reason", 0)):
            self.register_buffer(name, torch.full((members,), value, dtype=torch.long), persistent=False)
        self.register_buffer("value", torch.zeros(members), persistent=False)

    @torch.no_grad()
    def observe(self, step: int, losses: torch.Tensor, fvus: torch.Tensor) -> None:
        """Record step ``step``'s ``losses`` and training ``fvus`` (one each per dictionary); no host
        synchronisation."""
        losses, fvus = losses.detach().float(), fvus.detach().float()
        non_finite = ~torch.isfinite(losses)
        reason = torch.where(non_finite, NON_FINITE, 0)
        if self.fvu_limit is not None:
            self.streak.copy_(torch.where(fvus > self.fvu_limit, self.streak + 1, 0))
            reason = torch.where(non_finite, reason, torch.where(self.streak >= self.window, FVU_HIGH, 0))
        new = (self.first_step < 0) & (reason > 0)
        self.first_step.copy_(torch.where(new, step, self.first_step))
        self.reason.copy_(torch.where(new, reason, self.reason))
        self.value.copy_(torch.where(new, torch.where(non_finite, losses, fvus), self.value))

    def earliest(self) -> Divergence | None:
        """The earliest divergence recorded on any process (the same answer on every process), or None. A
        collective and one host synchronisation: call it every few steps, on every process."""
        record = torch.stack([self.first_step.double(), self.reason.double(), self.value.double()], dim=1)
        everywhere = gather_rows(record[None]).flatten(0, 1).cpu()  # [processes * members, 3]
        members = len(self.first_step)
        seen = [(int(step), i % members, int(reason), float(value))
                for i, (step, reason, value) in enumerate(everywhere.tolist()) if step >= 0]
        if not seen:
            return None
        step, member, reason, value = min(seen)
        return Divergence(member, step, reason, value)


@torch.no_grad()
def skip_non_finite_step(optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter]) -> None:
    """Make ``optimizer`` (fused Adam) skip its next step, on the device, if any gradient is not finite.

    Called after the backward pass (and DDP's gradient all-reduce, so every process decides alike): fused Adam
    leaves the weights, its moments and its step count untouched when ``found_inf`` is 1."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        found = torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().any()
        optimizer.found_inf = found.float()
