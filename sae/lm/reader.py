"""The one activation reader: batches of contexts through the frozen LM, cut off after the deepest hook.

Every consumer (the training stream, the activation cache, held-out metrics, feature records, baselines' fitting
sample) reads through these functions, so batching, the cut-off forward and the ordinary-text mask are written
once. Reading runs under ``torch.no_grad`` (not ``inference_mode``): the tensors it returns are ordinary ones that
may later enter a graph, e.g. as the clean side of a spliced forward with gradients on (``sae.lm.splice``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from sae.lm.hooks import HookPoint, intervene

Batch = dict[str, torch.Tensor]  # hook name -> [n, width], rows aligned across hooks


def token_mask(input_ids: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """True where a position is ordinary text (not BOS, EOS or padding): the positions trained on and spliced."""
    return ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, hooks: list[HookPoint], input_ids: torch.Tensor) -> dict[HookPoint, torch.Tensor]:
    """Activations ``[batch, seq, width]`` at each hook, in the model's dtype.

    The forward is cut short by an exception once every hook has been read, so no later block and no unembedding
    runs."""
    acts: dict[HookPoint, torch.Tensor] = {}

    def reader(hook: HookPoint):
        def fn(x: torch.Tensor) -> None:
            acts[hook] = x.detach()
            if len(acts) == len(hooks):
                raise _StopForward

        return fn

    with contextlib.ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(intervene(model, hook, reader(hook)))
        try:
            model(input_ids=input_ids.to(model_device(model)), use_cache=False)
        except _StopForward:
            pass
    missing = [h.name for h in hooks if h not in acts]
    if missing:
        raise RuntimeError(f"hooks never fired: {missing}")
    return acts


def read_batches(model: nn.Module, hooks: list[HookPoint], contexts: torch.Tensor, batch_size: int,
                 desc: str | None = None) -> Iterator[tuple[torch.Tensor, dict[HookPoint, torch.Tensor]]]:
    """``(input_ids, activations)`` for each batch of ``batch_size`` contexts, ids on the model's device; a progress
    bar when ``desc`` is given."""
    device = model_device(model)
    starts = range(0, len(contexts), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None):
        ids = contexts[start : start + batch_size].to(device)
        yield ids, capture(model, hooks, ids)


def ordinary_rows(acts: dict[HookPoint, torch.Tensor], input_ids: torch.Tensor, special_ids: list[int]) -> Batch:
    """Each hook's activations at the ordinary-text positions of ``input_ids``, flattened, in float32."""
    keep = token_mask(input_ids, special_ids)
    return {hook.name: a[keep].float() for hook, a in acts.items()}


def read_rows(model: nn.Module, hooks: list[HookPoint], contexts: torch.Tensor, special_ids: list[int],
              batch_size: int = 32, desc: str | None = None) -> Batch:
    """Activations ``[n, width]`` (float32) at every hook over the ordinary-text positions of ``contexts``, in
    context order, rows aligned across hooks."""
    parts = [
        ordinary_rows(acts, ids, special_ids) for ids, acts in read_batches(model, hooks, contexts, batch_size, desc)
    ]
    return {hook.name: torch.cat([p[hook.name] for p in parts]) for hook in hooks}
