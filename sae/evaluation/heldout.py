"""Held-out metrics: reconstruction and sparsity on held-out activations, and the LM's loss with each dictionary
spliced in (``metrics.json`` at the end of training, ``eval.json`` in ``evaluate.py``: one implementation)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from sae.dictionaries import Dictionary
from sae.evaluation.metrics import NextTokenScorer, Tally
from sae.lm.hooks import HookPoint
from sae.lm.reader import model_device, read_rows, token_mask
from sae.lm.splice import Reconstruct, Replace, spliced_forward


@torch.no_grad()
def heldout_metrics_many(
    model: nn.Module,
    dictionaries: dict[str, Dictionary],
    hook: HookPoint,
    contexts: torch.Tensor,
    special_ids: list[int],
    batch_size: int = 8,
    progress: bool = True,
    activations: torch.Tensor | None = None,
) -> dict[str, dict]:
    """Held-out metrics of several dictionaries at one hook, sharing the clean and ablated forwards.

    ``activations``: the activations at ``hook`` over ``contexts`` (``read_rows``) when the caller already has
    them (they give the mean for mean ablation; otherwise one cut-off pass reads them).

    Per batch of contexts the LM runs once clean (reading the activation), once with zeros and once with the
    mean activation at ``hook``, and once per dictionary with its reconstruction spliced in. Splicing and ablation
    replace the activation at ordinary-text positions only (BOS/EOS/pad keep the model's own, as in training).
    CE and KL are means over every next-token prediction of the contexts.
    """
    special, device = special_ids, model_device(model)
    if activations is None:
        activations = read_rows(model, [hook], contexts, special, batch_size)[hook.name]
    mean = activations.double().mean(0).float()
    tallies = {name: Tally(d, device) for name, d in dictionaries.items()}
    ce, n_pred = {"clean": 0.0, "zero": 0.0, "mean": 0.0, "kl_zero": 0.0}, 0
    for start in tqdm(range(0, len(contexts), batch_size), desc=f"held-out eval {hook.name}", disable=not progress):
        ids = contexts[start : start + batch_size].to(device)
        keep = token_mask(ids, special)
        clean = spliced_forward(model, ids, {}, special, read=[hook])
        scorer = NextTokenScorer(clean.logits, ids)
        ce["clean"] += scorer.ce(clean.logits)
        zeroed = spliced_forward(model, ids, {hook: Replace(torch.zeros(()))}, special).logits
        ce_zero, kl_zero = scorer.ce_and_kl(zeroed)
        del zeroed
        ce["zero"] += ce_zero
        ce["kl_zero"] += kl_zero  # SAEBench's kl_div_with_ablation
        ce["mean"] += scorer.ce(spliced_forward(model, ids, {hook: Replace(mean)}, special).logits)
        x = clean.activations[hook][keep].float()
        for tally in tallies.values():
            tally.add_reconstruction(x)
            # inline: a spliced batch's logits (batch x seq x vocab) must not outlive its scoring
            ce_spliced, kl = scorer.ce_and_kl(
                spliced_forward(model, ids, {hook: Reconstruct(tally.dictionary)}, special).logits
            )
            tally.ce += ce_spliced
            tally.kl += kl
        n_pred += ids[:, 1:].numel()
    ce = {k: v / n_pred for k, v in ce.items()}
    return {name: tally.summary(ce, n_pred) for name, tally in tallies.items()}


def heldout_metrics(model: nn.Module, dictionary: Dictionary, hook: HookPoint, contexts: torch.Tensor,
                    special_ids: list[int], batch_size: int = 8, progress: bool = True) -> dict:
    """Reconstruction, sparsity and spliced-LM metrics of one dictionary on held-out ``contexts``.

    See ``heldout_metrics_many``; the keys are listed in the README (held-out metrics).
    """
    return heldout_metrics_many(model, {"dictionary": dictionary}, hook, contexts, special_ids, batch_size, progress)[
        "dictionary"
    ]
