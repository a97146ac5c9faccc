"""Live activations: run the frozen LM over token contexts, keep the non-special positions, shuffle across contexts."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from sae.hooks import HookPoint, read_activations

Batch = dict[str, torch.Tensor]  # hook name -> [n, width], rows aligned across hooks


def context_batches(contexts: torch.Tensor, batch_size: int, generator: torch.Generator, epochs: int | None = None) -> Iterator[torch.Tensor]:
    """Batches of contexts in a fresh random order each epoch; forever when ``epochs`` is None."""
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(len(contexts), generator=generator)
        for i in range(0, len(order), batch_size):
            yield contexts[order[i : i + batch_size]]
        epoch += 1


def token_mask(input_ids: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """True where a position is ordinary text (not BOS, EOS or padding)."""
    return ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))


def live_activations(
    model: nn.Module,
    hooks: list[HookPoint],
    context_stream: Iterator[torch.Tensor],
    special_ids: list[int],
    device: torch.device,
) -> Iterator[Batch]:
    """Activations of each batch of contexts at ``hooks``, flattened over ordinary-text positions, in float32."""
    for input_ids in context_stream:
        input_ids = input_ids.to(device)
        acts = read_activations(model, hooks, input_ids)
        keep = token_mask(input_ids, special_ids)
        yield {hook.name: acts[hook][keep].float() for hook in hooks}


def shuffled_batches(source: Iterator[Batch], buffer_size: int, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Mix rows from many source chunks in a buffer of ``buffer_size`` rows and emit batches of ``batch_size``.

    When the buffer is full it is permuted and all but half of it is emitted; the kept half mixes with the next
    fill. Consecutive tokens of one context therefore land in different batches.
    """
    if buffer_size < 2 * batch_size:
        raise ValueError(f"buffer_size ({buffer_size}) must be at least twice batch_size ({batch_size})")
    store: Batch = {}
    for chunk in source:
        store = {k: torch.cat([store[k], v]) if store else v for k, v in chunk.items()}
        rows = len(next(iter(store.values())))
        if rows < buffer_size:
            continue
        perm = torch.randperm(rows, generator=generator).to(next(iter(store.values())).device)
        store = {k: v[perm] for k, v in store.items()}
        n_out = (rows - buffer_size // 2) // batch_size * batch_size
        for i in range(0, n_out, batch_size):
            yield {k: v[i : i + batch_size] for k, v in store.items()}
        store = {k: v[n_out:] for k, v in store.items()}
