"""Reconstruction and sparsity metrics, and the LM's loss with a dictionary spliced in at a hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sae.activations import token_mask
from sae.dictionaries import Dictionary
from sae.hooks import HookPoint, intervene


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


def dictionary_mmcs(a: Dictionary | str, b: Dictionary | str) -> float:
    """MMCS of ``a``'s atoms against ``b``'s: the paper's proxy for convergence when no ground truth exists
    (compare a dictionary with the next larger one). Dictionaries or run directories."""
    from sae.saving import load

    a, b = (load(x) if not isinstance(x, Dictionary) else x for x in (a, b))
    with torch.no_grad():
        return mmcs(a.decoder_weight(), b.decoder_weight())


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of ``logits[:, :-1]`` against ``input_ids[:, 1:]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum")


def _where(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(keep.unsqueeze(-1), new.to(old.dtype), old)


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


@torch.no_grad()
def heldout_metrics(
    model: nn.Module,
    dictionary: Dictionary,
    hook: HookPoint,
    contexts: torch.Tensor,
    special_ids: list[int],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Reconstruction, sparsity and spliced-LM metrics of ``dictionary`` on held-out ``contexts``.

    Splicing and zero ablation replace the activation at ordinary-text positions only (BOS/EOS/pad keep the
    model's own activation, as in training). CE is the mean next-token loss over every position of the contexts.
    """
    device = next(model.parameters()).device
    dictionary = dictionary.to(device)
    moments, ce = _Moments(), {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    sq_err_norm, l0_sum, fired = 0.0, 0.0, torch.zeros(dictionary.n_features, device=device)
    n_pred = 0
    for start in tqdm(range(0, len(contexts), batch_size), desc="held-out eval", disable=not progress):
        ids = contexts[start : start + batch_size].to(device)
        keep = token_mask(ids, special_ids)
        captured: dict[str, torch.Tensor] = {}

        def capture(x: torch.Tensor) -> None:
            captured["x"] = x

        with intervene(model, hook, capture):
            ce["clean"] += next_token_ce(model(input_ids=ids, use_cache=False).logits, ids).item()
        x = captured["x"][keep].float()
        codes = dictionary.encode(x)
        x_hat = dictionary.decode(codes)
        moments.add(x, x_hat)
        sq_err_norm += ((x - x_hat) / dictionary.scale).pow(2).sum().item()
        l0_sum += (codes != 0).sum().item()
        fired += (codes != 0).sum(0)

        def splice(act: torch.Tensor) -> torch.Tensor:
            return _where(keep, dictionary(act.float()), act)

        def zero(act: torch.Tensor) -> torch.Tensor:
            return _where(keep, torch.zeros_like(act), act)

        for name, fn in (("spliced", splice), ("zero", zero)):
            with intervene(model, hook, fn):
                ce[name] += next_token_ce(model(input_ids=ids, use_cache=False).logits, ids).item()
        n_pred += ids[:, 1:].numel()
    n = moments.n
    ce = {k: v / n_pred for k, v in ce.items()}
    return {
        "mse": sq_err_norm / n,
        "fvu": moments.fvu(),
        "l0": l0_sum / n,
        "dead_frac": (fired == 0).float().mean().item(),
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
        "n_tokens": n,
    }
