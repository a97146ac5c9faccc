"""What a circuit study reads from the held-out text before it searches: each feature's mean code (the value mean
ablation sets), the tokens it fires on (a node's top tokens), its maximum per context; and from these the contexts
a feature target is read on (the paper's rule: the target's maximum in a context in ``[M/2, M]``, ``M`` its maximum
over the held-out text, read at the position of that context's maximum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.circuits.discovery import Contexts
from sae.dictionaries import Dictionary, encode_parts
from sae.errors import ConfigError
from sae.features.streaming import TokenMass
from sae.lm.hooks import HookPoint
from sae.lm.reader import read_batches, token_mask

CANDIDATES_PER_FORWARD = 16  # upstream features ablated together in one forward (each on its own copy of the batch)


@dataclass
class HeldOut:
    """One dictionary's codes over the held-out contexts, summarised."""

    mean: torch.Tensor  # [n_features] mean code over ordinary positions
    vocab: torch.Tensor  # [u] the distinct token ids
    mass: torch.Tensor  # [u, n_features] summed code on each token (sparse: only the pairs that fired)
    context_max: torch.Tensor  # [n_contexts, n_features]
    context_argmax: torch.Tensor  # [n_contexts, n_features] the position of that maximum

    def top_tokens(self, index: int, n: int = 3) -> list[int]:
        """The ``n`` token ids carrying most of the feature's summed activation (those with any)."""
        column = self.mass.index_select(1, torch.tensor([index])).to_dense()[:, 0] if self.mass.is_sparse \
            else self.mass[:, index]
        values, order = column.topk(min(n, len(self.vocab)))
        return [int(self.vocab[i]) for v, i in zip(values, order) if v > 0]


@torch.no_grad()
def heldout_statistics(model, special_ids: list[int], dictionaries: dict[HookPoint, Dictionary], contexts: torch.Tensor,
                       batch_size: int) -> dict[HookPoint, HeldOut]:
    """One pass over ``contexts`` reading every hook; each dictionary's ``HeldOut``."""
    mask = token_mask(contexts, special_ids)
    vocab = torch.unique(contexts[mask])
    sums = {h: torch.zeros(d.n_features) for h, d in dictionaries.items()}
    mass = {h: TokenMass(d.n_features) for h, d in dictionaries.items()}  # not [tokens x features]: sparse
    maxima = {h: [] for h in dictionaries}
    hooks = list(dictionaries)
    for ids, acts in read_batches(model, hooks, contexts, batch_size, desc="circuits: held-out codes"):
        ids, keep = ids.cpu(), token_mask(ids, special_ids).cpu()
        for hook, d in dictionaries.items():
            for first, codes in encode_parts(d, acts[hook].to(d.b_dec.dtype)):
                part_keep = keep[first: first + len(codes)]
                codes = codes.float().cpu().mul_(part_keep.unsqueeze(-1))
                kept = codes[part_keep]
                sums[hook] += kept.sum(0)
                row, feature = (kept > 0).nonzero(as_tuple=True)
                mass[hook].add(feature, ids[first: first + len(codes)][part_keep][row], kept[row, feature])
                maxima[hook].append(codes.max(dim=1))
    count = max(1, int(mask.sum()))
    return {h: HeldOut(sums[h] / count, vocab, _sparse(mass[h], vocab), torch.cat([m.values for m in maxima[h]]),
                       torch.cat([m.indices for m in maxima[h]])) for h in dictionaries}


def _sparse(mass: TokenMass, vocab: torch.Tensor) -> torch.Tensor:
    """The summed codes as a sparse ``[len(vocab), n_features]`` tensor."""
    feature, token, amount = mass.pairs()
    index = torch.stack([torch.searchsorted(vocab, token), feature])
    return torch.sparse_coo_tensor(index, amount.float(), (len(vocab), mass.n_features)).coalesce()


def feature_contexts(stats: HeldOut, contexts: torch.Tensor, index: int, n_contexts: int, batch_rows: int,
                     what: str) -> tuple[list[Contexts], dict]:
    """Up to ``n_contexts`` held-out contexts whose maximum of feature ``index`` is in ``[M/2, M]``, in held-out
    order, each cut after its read position; and a record of the choice. The contexts are batched by length, a few
    per batch (``batch_rows // CANDIDATES_PER_FORWARD``), so an ablation forward (contexts x candidates) runs few
    tokens past any context's read position."""
    values = stats.context_max[:, index]
    top = float(values.max()) if len(values) else 0.0
    if top <= 0:
        raise ConfigError(f"{what} never fires on the {len(contexts)} held-out contexts read; choose another target "
                          "or read more held-out text (eval_tokens=...)")
    chosen = (values >= top / 2).nonzero().squeeze(-1)[:n_contexts]
    positions = stats.context_argmax[chosen, index]
    batches = []
    by_length = chosen[positions.argsort(stable=True)]  # few contexts of like length per batch: less padding-free waste
    for part in by_length.split(max(1, batch_rows // CANDIDATES_PER_FORWARD)):
        pos = stats.context_argmax[part, index]
        batches.append(Contexts(contexts[part, : int(pos.max()) + 1], pos))
    record = {"max_M": top, "contexts": len(chosen), "asked": n_contexts, "context_indices": chosen.tolist(),
              "positions": positions.tolist(), "values": [round(float(v), 4) for v in values[chosen]]}
    return batches, record
