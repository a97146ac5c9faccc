"""One step of an end-to-end objective: the LM run clean and with dictionaries spliced in, the terms each needs.

The clean run (no gradient) gives the clean next-token distributions, the activation at every dictionary's hook
(its training input) and at the block outputs after it (the downstream targets). The spliced runs go through
``sae.lm.splice.spliced_forward`` with ``Reconstruct(d)`` and autograd on: gradients flow through the frozen later
blocks into the dictionaries only (the LM's parameters have ``requires_grad=False`` and are in no optimizer).

``splice="each"`` runs one spliced forward per dictionary, alone, so each trains on the KL ``evaluate.py`` measures
for it; ``"all"`` runs one forward with the whole set spliced in, and every dictionary shares that KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sae.dictionaries import Dictionary
from sae.evaluation.metrics import NextTokenScorer, kl_from_hidden
from sae.lm.hooks import HookPoint
from sae.lm.reader import model_device, token_mask
from sae.lm.splice import Reconstruct, linear_unembedding, spliced_forward


def n_layers(model_config) -> int:
    """Blocks of an LM, from its config."""
    return getattr(model_config, "num_hidden_layers", None) or model_config.n_layer


def downstream_hooks(hook: HookPoint, layers: int) -> list[HookPoint]:
    """The block outputs after ``hook``: blocks ``layer+1 ..`` for a ``resid`` hook (itself a block output), blocks
    ``layer ..`` for a site inside a block."""
    first = hook.layer + 1 if hook.site == "resid" else hook.layer
    return [HookPoint(layer, "resid") for layer in range(first, layers)]


def downstream_error(spliced: dict[HookPoint, torch.Tensor], clean: dict[HookPoint, torch.Tensor],
                     hooks: list[HookPoint], keep: torch.Tensor) -> torch.Tensor:
    """Mean over ``hooks`` of sum ||a_spliced - a_clean||^2 / sum ||a_clean - mean||^2 at ordinary positions (0 when
    there are none)."""
    if not hooks:
        return torch.zeros((), device=keep.device)
    errors = []
    for hook in hooks:
        a, b = spliced[hook][keep].float(), clean[hook][keep].float()
        errors.append((a - b).pow(2).sum() / (b - b.mean(0)).pow(2).sum().clamp_min(1e-12))
    return torch.stack(errors).mean()


@dataclass
class SplicedTerms:
    """What one dictionary's loss needs from the LM: its clean input at ordinary positions (model units), the
    spliced run's mean KL and downstream error."""

    x: torch.Tensor
    kl: torch.Tensor
    downstream: torch.Tensor


class _CleanRun:
    """The clean run's next-token distributions, and how a spliced run's KL against them is computed: from the
    final hidden states, a chunk at a time (``kl_from_hidden``), when the model's head is a plain linear map, else
    from the logits (``NextTokenScorer``). Both are ``kl_spliced``'s per-token terms."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, special_ids: list[int], read: list[HookPoint],
                 from_states: bool):
        self.model, self.input_ids, self.special_ids = model, input_ids, special_ids
        self.unembedding = linear_unembedding(model) if from_states else None
        with torch.no_grad():
            run = spliced_forward(model, input_ids, {}, special_ids, read=read, hidden=self.unembedding is not None)
        self.activations = run.activations
        self.hidden = run.hidden
        self.scorer = NextTokenScorer(run.logits, input_ids) if self.unembedding is None else None

    def spliced(self, edits: dict, read: list[HookPoint]) -> tuple[torch.Tensor, dict[HookPoint, torch.Tensor]]:
        """The mean KL(clean || spliced) with ``edits`` spliced in (autograd on), and the activations read."""
        run = spliced_forward(self.model, self.input_ids, edits, self.special_ids, read=read,
                              hidden=self.unembedding is not None)
        if self.unembedding is None:
            return self.scorer.kl_per_token(run.logits).mean(), run.activations
        return kl_from_hidden(run.hidden, self.hidden, *self.unembedding).mean(), run.activations


def spliced_terms(model: nn.Module, input_ids: torch.Tensor, special_ids: list[int],
                  members: list[tuple[HookPoint, Dictionary]], later: list[list[HookPoint]],
                  splice: str, from_states: bool = True) -> list[SplicedTerms]:
    """The terms of each ``(hook, dictionary)`` of ``members`` on the contexts ``input_ids``; ``later[i]``: the
    downstream hooks of member ``i`` (empty unless the objective uses them). ``from_states=False``: the KL from
    the logits even where the head allows the faster path (the benchmark's comparison)."""
    input_ids = input_ids.to(model_device(model))
    keep = token_mask(input_ids, special_ids)
    hooks = list(dict.fromkeys([h for h, _ in members] + [h for hs in later for h in hs]))
    clean = _CleanRun(model, input_ids, special_ids, hooks, from_states)
    xs = [clean.activations[hook][keep].float() for hook, _ in members]
    if splice == "all":
        read = list(dict.fromkeys(h for hs in later for h in hs))
        kl, seen = clean.spliced({h: Reconstruct(d) for h, d in members}, read)
        return [SplicedTerms(x, kl, downstream_error(seen, clean.activations, hs, keep)) for x, hs in zip(xs, later)]
    terms = []
    for (hook, dictionary), x, hs in zip(members, xs, later):
        kl, seen = clean.spliced({hook: Reconstruct(dictionary)}, hs)
        terms.append(SplicedTerms(x, kl, downstream_error(seen, clean.activations, hs, keep)))
    return terms
