"""Each text's latents pooled over its ordinary tokens (BOS, EOS and padding left out), for several methods at
several hooks from one LM pass per batch of texts.

Memory is bounded by a batch: the codes ``[texts, tokens, latents]`` of one batch exist only while it is pooled;
what is kept is ``[n_texts, latents]`` per method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from sae.errors import ConfigError
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture, token_mask
from sae.lm.text import separators

Encoder = Callable[[torch.Tensor], torch.Tensor]  # activations [n, d_in] -> latents [n, width]


@dataclass
class Method:
    """One probed decomposition at one hook: a dictionary, a baseline, or the raw activations."""

    name: str
    hook: HookPoint
    encode: Encoder
    width: int
    entry: object = None  # the evaluation's Entry (None for the raw activations)


def tokenize(texts: list[str], tokenizer, max_tokens: int, special_ids: list[int], where: str) -> list[list[int]]:
    """Each text's ids: BOS, then its first ``max_tokens`` tokens; one line naming the first text with no ordinary
    token (empty, or special tokens only)."""
    bos, _ = separators(tokenizer)
    out = []
    for number, text in enumerate(texts, 1):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if not any(i not in special_ids for i in ids):
            raise ConfigError(f"{where}: text {number} ({text[:40]!r}) has no ordinary token after special tokens "
                              "are left out; remove it or give it text")
        out.append([bos, *ids])
    return out


def pool(codes: torch.Tensor, keep: torch.Tensor, how: str) -> torch.Tensor:
    """``[b, seq, width]`` codes pooled over the positions where ``keep`` ``[b, seq]`` is true: mean or max."""
    if how == "max":
        return codes.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)
    weights = keep.unsqueeze(-1).to(codes.dtype)
    return (codes * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def pooled_latents(model, methods: list[Method], ids: list[list[int]], special_ids: list[int], pad_id: int,
                   batch_size: int, how: str, desc: str | None = None) -> dict[tuple[str, str], np.ndarray]:
    """``(method name, hook name) -> [n_texts, width]`` pooled latents, texts in the order of ``ids``."""
    hooks = list(dict.fromkeys(m.hook for m in methods))
    out = {(m.name, m.hook.name): np.zeros((len(ids), m.width), dtype=np.float32) for m in methods}
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
        rows = order[start: start + batch_size]
        length = max(len(ids[i]) for i in rows)
        batch = torch.full((len(rows), length), pad_id, dtype=torch.long)
        for j, i in enumerate(rows):
            batch[j, : len(ids[i])] = torch.tensor(ids[i])
        batch = batch.to(device)
        keep = token_mask(batch, special_ids)
        acts = capture(model, hooks, batch)
        for m in methods:
            x = acts[m.hook].float()
            codes = m.encode(x.reshape(-1, x.shape[-1])).reshape(len(rows), length, -1)
            out[(m.name, m.hook.name)][rows] = pool(codes, keep, how).cpu().numpy()
    return out
