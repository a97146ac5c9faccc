"""Reconstruction and sparsity metrics, and the LM's loss with a dictionary spliced in at a hook."""

from __future__ import annotations

import math

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sae.activations import live_activations, token_mask
from sae.dictionaries import Dictionary
from sae.hooks import HookPoint, intervene

DENSE_DENSITY = 0.1  # a feature firing on more than this fraction of tokens is dense
DENSITY_BINS = 24  # log10 feature-density histogram: bins between log10(1 / n_tokens) and 0
L0_BINS = 32


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, centred: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero codes per input."""
    return (codes != 0).float().sum(-1).mean()


def best_cosines(reference: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For each ``reference`` row, the maximum cosine similarity to any ``learned`` row."""
    cos = F.normalize(reference.float(), dim=-1) @ F.normalize(learned.float(), dim=-1).T
    return cos.max(dim=1).values


def mmcs(reference: torch.Tensor, learned: torch.Tensor) -> float:
    """Mean max cosine similarity: how well ``learned`` directions cover the ``reference`` ones (1 = all found)."""
    return best_cosines(reference, learned).mean().item()


def recovered_fraction(reference: torch.Tensor, learned: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of ``reference`` rows matched by a ``learned`` row with cosine similarity above ``threshold``."""
    return (best_cosines(reference, learned) > threshold).float().mean().item()


def dictionary_mmcs(a: Dictionary | str | Path, b: Dictionary | str | Path) -> float:
    """MMCS of ``a``'s atoms against ``b``'s: the paper's proxy for convergence when no ground truth exists
    (compare a dictionary with the next larger one). Dictionaries, run directories or training checkpoints
    (``<run>/checkpoints/*.ckpt``, a run's only dictionary)."""
    from sae.checkpoints import dictionary_from_checkpoint
    from sae.saving import load

    def resolve(x):
        if isinstance(x, Dictionary):
            return x
        return dictionary_from_checkpoint(x) if str(x).endswith(".ckpt") else load(x)

    a, b = resolve(a), resolve(b)
    with torch.no_grad():
        return mmcs(a.decoder_weight(), b.decoder_weight())


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product over the last dimension, ``[..., V] x [..., V] -> [...]``, as a batched matmul (no temporary)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


class NextTokenScorer:
    """Summed next-token CE of any logits, and KL(clean || them), against one batch's clean logits.

    Positions ``[:, :-1]`` predict ``input_ids[:, 1:]``. With clean logits c (log-sum-exp C, softmax p) and logits z
    (log-sum-exp L): CE = L - z[target] and KL = (L - C) sum p - sum p (z - c). Scoring costs one log-sum-exp and one
    dot product per position (the vocabulary-wide work dominates on a CPU); working with z - c keeps float32 exact
    enough for the small KLs of good reconstructions.
    """

    def __init__(self, clean_logits: torch.Tensor, input_ids: torch.Tensor):
        self.targets = input_ids[:, 1:].unsqueeze(-1)
        self.clean = clean_logits[:, :-1].float()
        self.clean_lse = torch.logsumexp(self.clean, -1)
        self.p = (self.clean - self.clean_lse.unsqueeze(-1)).exp()
        self.p_sum = self.p.sum(-1)

    def ce(self, logits: torch.Tensor) -> float:
        z = logits[:, :-1].float()
        return (torch.logsumexp(z, -1) - z.gather(-1, self.targets).squeeze(-1)).double().sum().item()

    def ce_and_kl(self, logits: torch.Tensor) -> tuple[float, float]:
        z = logits[:, :-1].float()
        lse = torch.logsumexp(z, -1)
        ce = (lse - z.gather(-1, self.targets).squeeze(-1)).double().sum().item()
        kl = ((lse - self.clean_lse) * self.p_sum - _row_dot(self.p, z - self.clean)).double().sum().item()
        return ce, kl


def histogram(values: torch.Tensor, bins: int, low: float, high: float) -> dict[str, list[float]]:
    """Equal-width histogram of ``values`` over ``[low, high]``, as JSON-ready ``edges`` and ``counts``."""
    counts, edges = torch.histogram(values.double().cpu(), bins=bins, range=(low, high))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def density_summary(fired: torch.Tensor, n_tokens: int) -> dict:
    """Dead and dense fractions and the log10 density histogram of features that fired ``fired`` times."""
    density = fired.double() / n_tokens
    live = density[density > 0]
    return {
        "dead_frac": (density == 0).double().mean().item(),
        "dense_frac": (density > DENSE_DENSITY).double().mean().item(),
        "log10_density_hist": histogram(live.log10(), DENSITY_BINS, -math.log10(n_tokens), 0.0),
    }


def _where(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(keep.unsqueeze(-1), new.to(old.dtype), old)


def _put(keep: torch.Tensor, rows: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``old`` with its ``keep`` positions replaced by ``rows`` (one row per kept position, in order)."""
    new = old.clone()
    new[keep] = rows.to(old.dtype)
    return new


class _Moments:
    """Running sums for centred FVU over many batches (float64)."""

    def __init__(self):
        self.n, self.sum_x, self.sum_sq, self.sum_err = 0, 0.0, 0.0, 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64 = x.double()
        self.n += len(x)
        self.sum_x = self.sum_x + x64.sum(0)
        self.sum_sq += x64.pow(2).sum().item()
        self.sum_err += (x64 - x_hat.double()).pow(2).sum().item()

    def fvu(self) -> float:
        total_var = self.sum_sq - (self.sum_x.pow(2).sum() / self.n).item()
        return self.sum_err / max(total_var, 1e-12)


class _Tally:
    """One dictionary's running sums over held-out batches: reconstruction, sparsity and spliced-LM loss."""

    def __init__(self, dictionary: Dictionary, device: torch.device):
        self.dictionary = dictionary.to(device)
        self.moments = _Moments()
        self.sq_err_norm, self.cosine, self.l2_ratio, self.ce, self.kl = 0.0, 0.0, 0.0, 0.0, 0.0
        self.nonzero = 0  # inputs with a direction: cosine and l2_ratio are averaged over these
        self.l0s: list[torch.Tensor] = []
        self.fired = torch.zeros(dictionary.n_features, device=device)

    def add_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """Add ``x`` ``[n, d_in]`` (model units) and its reconstruction to the sums; return the reconstruction."""
        codes = self.dictionary.encode(x)
        x_hat = self.dictionary.decode(codes)
        self.moments.add(x, x_hat)
        self.sq_err_norm += ((x - x_hat) / self.dictionary.scale).pow(2).sum().item()
        norms = x.norm(dim=-1)
        has_direction = norms > 0  # an all-zero input (a toy sample where nothing fires) has no ratio or angle
        self.nonzero += int(has_direction.sum())
        self.cosine += F.cosine_similarity(x_hat, x, dim=-1)[has_direction].sum().item()
        self.l2_ratio += (x_hat.norm(dim=-1) / norms)[has_direction].sum().item()
        active = codes != 0
        self.l0s.append(active.sum(-1).cpu())
        self.fired += active.sum(0)
        return x_hat

    def reconstruction_summary(self) -> dict:
        n = self.moments.n
        l0s = torch.cat(self.l0s).double()
        return {
            "mse": self.sq_err_norm / n,
            "fvu": self.moments.fvu(),
            "cosine": self.cosine / max(self.nonzero, 1),
            "l2_ratio": self.l2_ratio / max(self.nonzero, 1),
            "l0": l0s.mean().item(),
            **density_summary(self.fired, n),
            "n_tokens": n,
            "l0_hist": histogram(l0s, L0_BINS, 0.0, max(l0s.max().item(), 1.0)),
        }

    def summary(self, ce: dict[str, float], n_pred: int) -> dict:
        spliced = self.ce / n_pred
        return {
            **self.reconstruction_summary(),
            "ce_clean": ce["clean"],
            "ce_spliced": spliced,
            "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"],
            "ce_loss_recovered": (ce["zero"] - spliced) / (ce["zero"] - ce["clean"]),
            "kl_spliced": self.kl / n_pred,
            "ppl_clean": math.exp(ce["clean"]),
            "ppl_spliced": math.exp(spliced),
        }


@torch.no_grad()
def reconstruction_metrics(dictionary: Dictionary, x: torch.Tensor) -> dict:
    """The reconstruction and sparsity part of the held-out metrics, on activations ``x`` ``[n, d_in]``."""
    tally = _Tally(dictionary, x.device)
    tally.add_reconstruction(x)
    return tally.reconstruction_summary()


def _batches(contexts: torch.Tensor, batch_size: int, device: torch.device, desc: str, progress: bool):
    for start in tqdm(range(0, len(contexts), batch_size), desc=desc, disable=not progress):
        yield contexts[start : start + batch_size].to(device)


@torch.no_grad()
def hook_activations(model: nn.Module, hook: HookPoint, contexts: torch.Tensor, special_ids: list[int], batch_size: int = 8) -> torch.Tensor:
    """Activations ``[n, width]`` at ``hook`` at the ordinary-text positions of ``contexts`` (forwards cut off at the hook)."""
    device = next(model.parameters()).device
    stream = live_activations(model, [hook], iter(contexts.split(batch_size)), special_ids, device)
    return torch.cat([batch[hook.name] for batch in stream])


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

    ``activations``: the ``hook_activations`` of ``contexts`` when the caller already has them (they give the
    mean for mean ablation; otherwise one cut-off pass reads them).

    Per batch of contexts the LM runs once clean (reading the activation), once with zeros and once with the
    mean activation at ``hook``, and once per dictionary with its reconstruction spliced in. Splicing and ablation
    replace the activation at ordinary-text positions only (BOS/EOS/pad keep the model's own, as in training).
    CE and KL are means over every next-token prediction of the contexts.
    """
    device = next(model.parameters()).device
    if activations is None:
        activations = hook_activations(model, hook, contexts, special_ids, batch_size)
    mean = activations.double().mean(0).float()
    tallies = {name: _Tally(d, device) for name, d in dictionaries.items()}
    ce, n_pred = {"clean": 0.0, "zero": 0.0, "mean": 0.0}, 0
    for ids in _batches(contexts, batch_size, device, f"held-out eval {hook.name}", progress):
        keep = token_mask(ids, special_ids)
        captured: dict[str, torch.Tensor] = {}

        def run(fn) -> torch.Tensor:
            with intervene(model, hook, fn):
                return model(input_ids=ids, use_cache=False).logits

        def capture(act: torch.Tensor) -> None:
            captured["x"] = act

        clean = run(capture)
        scorer = NextTokenScorer(clean, ids)
        ce["clean"] += scorer.ce(clean)
        ce["zero"] += scorer.ce(run(lambda act: _where(keep, torch.zeros_like(act), act)))
        ce["mean"] += scorer.ce(run(lambda act: _where(keep, mean.expand_as(act), act)))
        x = captured["x"][keep].float()
        for tally in tallies.values():
            x_hat = tally.add_reconstruction(x)
            ce_spliced, kl = scorer.ce_and_kl(run(lambda act: _put(keep, x_hat, act)))
            tally.ce += ce_spliced
            tally.kl += kl
        n_pred += ids[:, 1:].numel()
    ce = {k: v / n_pred for k, v in ce.items()}
    return {name: tally.summary(ce, n_pred) for name, tally in tallies.items()}


def heldout_metrics(
    model: nn.Module,
    dictionary: Dictionary,
    hook: HookPoint,
    contexts: torch.Tensor,
    special_ids: list[int],
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Reconstruction, sparsity and spliced-LM metrics of one dictionary on held-out ``contexts``.

    See ``heldout_metrics_many``; the keys are listed in the README (held-out metrics).
    """
    return heldout_metrics_many(model, {"dictionary": dictionary}, hook, contexts, special_ids, batch_size, progress)["dictionary"]
