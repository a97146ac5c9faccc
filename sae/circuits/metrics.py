"""What a patch achieves, from next-token logits at the final position and from the edited activations.

Direction of the KL: ``KL(patched || counterfactual) = Σ_v p_patched(v) (log p_patched(v) − log p_cf(v))``, the
paper's choice: it is small when the patched run puts its mass where the counterfactual run does. It is computed at
the final position of each prompt (where the answer is predicted) and averaged over pairs; with nothing patched it
is ``KL(base || counterfactual)``, the "unpatched KL" the patching curves start from.

Logit difference: ``logit[counterfactual answer] − logit[base answer]``; the fraction restored is
``(LD_patched − LD_base) / (LD_cf − LD_base)`` on the means over pairs (0: still the base run, 1: the
counterfactual's preference), a ratio of means so that pairs where the model barely distinguishes the answers do not
blow it up.

Edit size: ``||x' − x||`` averaged over the positions the patch changes (ordinary positions where some patched
feature's code differs between the two runs), not over every position: BOS and the prefix the two prompts share are
never changed, and counting them would shrink the figure by the share of the prompt they take. The outputs call it
``edit_per_changed_position`` and give ``changed_positions`` (per pair) beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision logits are widened; float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def final_position(logits: torch.Tensor) -> torch.Tensor:
    """``[b, T, V]`` -> ``[b, V]`` at the last position (pairs are batched by length, so it is every row's last)."""
    return logits[:, -1] if logits.dim() == 3 else logits


def kl_patched_to_counterfactual(patched_logits: torch.Tensor, counterfactual_logits: torch.Tensor) -> torch.Tensor:
    """Per pair ``[b]``: KL(patched || counterfactual) of the next-token distributions at the final position."""
    log_p = F.log_softmax(wide(final_position(patched_logits)), dim=-1)
    log_q = F.log_softmax(wide(final_position(counterfactual_logits)), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)  # rounding can dip a hair below 0


def mean_kl(patched_logits: torch.Tensor, counterfactual_logits: torch.Tensor) -> torch.Tensor:
    """The patching metric: KL(patched || counterfactual) averaged over pairs (a 0-dim tensor, differentiable)."""
    return kl_patched_to_counterfactual(patched_logits, counterfactual_logits).mean()


def logit_difference(
    logits: torch.Tensor, base_answer: torch.Tensor, counterfactual_answer: torch.Tensor
) -> torch.Tensor:
    """Per pair ``[b]``: logit of the counterfactual answer minus logit of the base answer, at the final position."""
    last = wide(final_position(logits))
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, counterfactual_answer] - last[rows, base_answer]


def fraction_restored(
    patched: torch.Tensor | float, base: torch.Tensor | float, counterfactual: torch.Tensor | float
) -> float:
    """``(mean patched − mean base) / (mean cf − mean base)`` of logit differences; NaN when base and cf agree."""
    p, b, c = (float(torch.as_tensor(v, dtype=torch.float64).mean()) for v in (patched, base, counterfactual))
    gap = c - b
    return (p - b) / gap if abs(gap) > 1e-12 else math.nan


def edit_size(patched_x: torch.Tensor, base_x: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over positions of ``||x' − x||`` (the last dim is the model's width); ``mask`` keeps some positions."""
    norms = (wide(patched_x) - wide(base_x)).norm(dim=-1)
    if mask is not None:
        norms = norms[mask]
    return float(norms.mean()) if norms.numel() else 0.0


def patch_report(patched_logits: torch.Tensor, base_logits: torch.Tensor, counterfactual_logits: torch.Tensor,
                 base_answer: torch.Tensor, counterfactual_answer: torch.Tensor) -> dict[str, float]:
    """The metrics of one patched run in one dict: KL, unpatched KL, logit differences and the fraction restored."""
    ld = {name: logit_difference(logits, base_answer, counterfactual_answer)
          for name, logits in (("patched", patched_logits), ("base", base_logits), ("cf", counterfactual_logits))}
    return {"kl": float(mean_kl(patched_logits, counterfactual_logits)),
            "unpatched_kl": float(mean_kl(base_logits, counterfactual_logits)),
            "logit_diff": float(ld["patched"].mean()), "logit_diff_base": float(ld["base"].mean()),
            "logit_diff_counterfactual": float(ld["cf"].mean()),
            "logit_diff_restored": fraction_restored(ld["patched"], ld["base"], ld["cf"])}


class PairTotals:
    """Sums over batches of pairs, so metrics over many batches are exact means over all pairs (not of batch means)."""

    def __init__(self) -> None:
        self.n, self.kl, self.ld_patched, self.ld_base, self.ld_cf = 0, 0.0, 0.0, 0.0, 0.0
        self.edit_sum, self.edit_count = 0.0, 0

    def add(self, patched_logits: torch.Tensor, base_logits: torch.Tensor, counterfactual_logits: torch.Tensor,
            base_answer: torch.Tensor, counterfactual_answer: torch.Tensor,
            delta: torch.Tensor | None = None, changed: torch.Tensor | None = None) -> None:
        """``delta``: ``x' − x`` ``[b, T, d]`` at the hook; ``changed``: ``[b, T]``, the positions the patch changes
        (the edit size is averaged over them only; every position when None)."""
        b = final_position(patched_logits).shape[0]
        self.n += b
        self.kl += float(kl_patched_to_counterfactual(patched_logits, counterfactual_logits).sum())
        self.ld_patched += float(logit_difference(patched_logits, base_answer, counterfactual_answer).sum())
        self.ld_base += float(logit_difference(base_logits, base_answer, counterfactual_answer).sum())
        self.ld_cf += float(logit_difference(counterfactual_logits, base_answer, counterfactual_answer).sum())
        if delta is not None:
            norms = wide(delta).norm(dim=-1)
            if changed is not None:
                norms = norms[changed]
            self.edit_sum, self.edit_count = self.edit_sum + float(norms.sum()), self.edit_count + norms.numel()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no pairs added")
        n = self.n
        return {"kl": self.kl / n, "logit_diff": self.ld_patched / n,
                "logit_diff_restored": fraction_restored(self.ld_patched / n, self.ld_base / n, self.ld_cf / n),
                "edit_per_changed_position": self.edit_sum / self.edit_count if self.edit_count else math.nan,
                "changed_positions": self.edit_count / n}
