"""Held-out metrics: reconstruction and sparsity on held-out activations, and the LM's loss with each dictionary
spliced in (``metrics.json`` at the end of training, ``eval.json`` in ``evaluate.py``: one implementation)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from sae.dictionaries import Dictionary
from sae.evaluation.metrics import NextTokenLosses, Tally, losses_from_hidden, losses_from_logits
from sae.lm.hooks import HookPoint
from sae.lm.reader import model_device, read_rows, token_mask
from sae.lm.splice import Edit, Replace, linear_unembedding, spliced_forward

SHARED = ("clean", "zero", "mean", "kl_zero", "kl_mean")  # a hook's sums, shared by its dictionaries


def spliced_losses(model: nn.Module, ids: torch.Tensor, hook: HookPoint, special_ids: list[int],
                   edits: Callable[[torch.Tensor], list[Edit]], unembedding: tuple | None) -> NextTokenLosses:
    """The next-token losses of the clean run and of one run per edit spliced in at ``hook``.

    ``edits``: a function of the clean activation ``[batch, seq, width]`` giving the edits (a reconstruction
    computed once from it, spliced as given). ``unembedding``: ``linear_unembedding(model)``: the losses from the
    final hidden states a chunk of positions at a time (``losses_from_hidden``); ``None``: from the logits. The
    runs share the clean run's blocks below the hook: each starts at the hook's block from the clean residual
    stream entering it (``Prefix``; where the model allows it)."""
    states = unembedding is not None
    clean = spliced_forward(model, ids, {}, special_ids, read=[hook], hidden=states, keep_prefix=hook.layer)
    runs = (spliced_forward(model, ids, {hook: e}, special_ids, hidden=states, prefix=clean.prefix)
            for e in edits(clean.activations[hook]))
    if not states:
        return losses_from_logits(clean.logits, (run.logits for run in runs), ids)
    return losses_from_hidden(clean.hidden, [run.hidden for run in runs], ids, *unembedding)


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
    from_states: bool = True,
) -> dict[str, dict]:
    """Held-out metrics of several dictionaries at one hook, sharing the clean and ablated forwards.

    ``activations``: the activations at ``hook`` over ``contexts`` (``read_rows``) when the caller already has
    them (they give the mean for mean ablation; otherwise one cut-off pass reads them). ``from_states=False``: the
    losses from full logits even where the head allows the chunked path (the tests' and the benchmark's reference).

    Per batch of contexts the LM runs once clean (reading the activation), once with zeros and once with the
    mean activation at ``hook``, and once per dictionary with its reconstruction of the clean activation spliced
    in. Splicing and ablation replace the activation at ordinary-text positions only (BOS/EOS/pad keep the model's
    own, as in training). CE and KL are means over every next-token prediction of the contexts; when the model's
    head is a plain linear map they are computed from the final hidden states a chunk of positions at a time, each
    chunk's clean distribution shared by every run (no ``[positions, vocabulary]`` tensor is held).
    """
    special, device = special_ids, model_device(model)
    if activations is None:
        activations = read_rows(model, [hook], contexts, special, batch_size)[hook.name]
    mean = activations.double().mean(0).float()
    unembedding = linear_unembedding(model) if from_states else None
    tallies = {name: Tally(d, device) for name, d in dictionaries.items()}
    sums, n_pred = dict.fromkeys(SHARED, 0.0), 0
    for start in tqdm(range(0, len(contexts), batch_size), desc=f"held-out eval {hook.name}", disable=not progress):
        ids = contexts[start : start + batch_size].to(device)
        keep = token_mask(ids, special)

        def edits(activation: torch.Tensor) -> list[Edit]:
            x = activation[keep].float()
            spliced = []
            for tally in tallies.values():
                full = activation.clone()
                full[keep] = tally.add_reconstruction(x).to(full.dtype)
                spliced.append(Replace(full))
            return [Replace(torch.zeros(())), Replace(mean), *spliced]

        losses = spliced_losses(model, ids, hook, special, edits, unembedding)
        for key, value in zip(SHARED, (losses.ce_clean, *losses.ce[:2], *losses.kl[:2])):
            sums[key] += value
        for tally, ce, kl in zip(tallies.values(), losses.ce[2:], losses.kl[2:]):
            tally.ce += ce
            tally.kl += kl
        n_pred += ids[:, 1:].numel()
    hook_metrics = {"ce_clean": sums["clean"] / n_pred, "ce_zero_ablation": sums["zero"] / n_pred,
                    "ce_mean_ablation": sums["mean"] / n_pred, "kl_zero_ablation": sums["kl_zero"] / n_pred,
                    "kl_mean_ablation": sums["kl_mean"] / n_pred}
    return {name: tally.summary(hook_metrics, n_pred) for name, tally in tallies.items()}


def heldout_metrics(model: nn.Module, dictionary: Dictionary, hook: HookPoint, contexts: torch.Tensor,
                    special_ids: list[int], batch_size: int = 8, progress: bool = True) -> dict:
    """Reconstruction, sparsity and spliced-LM metrics of one dictionary on held-out ``contexts``.

    See ``heldout_metrics_many``; the keys are listed in docs/training.md (held-out metrics).
    """
    return heldout_metrics_many(model, {"dictionary": dictionary}, hook, contexts, special_ids, batch_size, progress)[
        "dictionary"
    ]
