"""BatchTopK dictionaries (Bussmann, Leask & Nanda 2024): the ``k · batch`` largest pre-activations of the whole
batch are kept in training, so inputs share a budget of ``k`` codes on average rather than each taking exactly ``k``.

A batch-level selection cannot encode one input alone, so the dictionary has an inference form, as in the paper:
a JumpReLU with one global threshold θ, codes = ReLU(pre) · [pre > θ]. θ is estimated *during* training, so no
extra pass is needed at the end: every training step (``train_terms``) moves the ``threshold`` buffer towards the
smallest positive code the batch selection kept (the batch's ``k · batch``-th largest value), an exponential moving
average with rate ``threshold_lr`` (the first step sets it outright). The learning rate decays to 0 over the
run's last steps, so the estimate ends as the average over the final batches of an almost fixed dictionary; it is
saved with the weights, and ``encode`` always uses it. ``calibrate_threshold_`` re-estimates it from a sample.
"""

from __future__ import annotations

import torch

from sae.dictionaries.base import register
from sae.dictionaries.sparse import scratch
from sae.dictionaries.topk import TopKDictionary, sparse_topk
from sae.errors import ConfigError


def batch_topk(pre: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, smallest)``: ``pre`` with every entry outside the ``round(k · batch)`` largest of ``ReLU(pre)`` over the
    whole ``[batch, n]`` matrix set to ``-inf``, and the smallest positive kept value (0 when none is positive)."""
    flat = torch.relu(pre).flatten()
    keep = min(len(flat), max(1, round(k * len(pre))))
    values, indices = flat.topk(keep, sorted=False)
    kept = torch.full_like(flat, float("-inf")).scatter_(0, indices, pre.flatten().gather(0, indices)).view_as(pre)
    positive = values[values > 0]
    return kept, positive.min() if len(positive) else pre.new_zeros(())


@register
class BatchTopKDictionary(TopKDictionary):
    """codes = BatchTopK_k(ReLU(W_enc (x − b_dec) + b_enc)) in training, ReLU(pre) · [pre > θ] at inference;
    x_hat = W_dec^T codes + b_dec. ``k`` may be fractional (a mean over the batch). AuxK as for TopK."""

    variant = "batchtopk"

    def __init__(
        self, d_in: int, n_features: int, *, k: float, aux_coeff: float, k_aux: int | None, threshold_lr: float
    ):
        if not 0 < threshold_lr <= 1:
            raise ConfigError(f"sae.threshold_lr={threshold_lr} must be in (0, 1]")
        super().__init__(d_in, n_features, k=k, aux_coeff=aux_coeff, k_aux=k_aux)
        self.threshold_lr = threshold_lr
        self.register_buffer("threshold", torch.zeros(()))

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return torch.relu(pre) * (pre > self.threshold)

    def select(self, x: torch.Tensor):
        """The batch selection of a training step: ``(pre, bias, atoms, values, indices)`` with ``values``/``indices``
        ``[batch, widest row]`` (rows with fewer kept codes padded with zeros, which get no gradient). Updates θ."""
        bias, atoms = self.encoder_bias(), self.decoder_weight()
        with torch.no_grad():
            pre = torch.addmm(bias, x, self.W_enc.T, out=scratch(len(x), self.n_features, x))
            kept, smallest = batch_topk(pre, self.k)
            width = max(1, int((kept > 0).sum(-1).max()))
            self._update_threshold(smallest)
        values, indices = sparse_topk(kept, x, self.W_enc, bias, width)
        return pre, bias, atoms, values, indices

    @torch.no_grad()
    def _update_threshold(self, smallest: torch.Tensor) -> None:
        if smallest <= 0:
            return
        first = bool(self.threshold <= 0)
        rate = 1.0 if first else self.threshold_lr
        self.threshold.mul_(1 - rate).add_(rate * smallest.to(self.threshold.dtype))

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pre, bias, atoms, values, indices = self.select(x)
        return self._sparse_terms(pre, x, bias, atoms, values, indices, dead)

    @torch.no_grad()
    def calibrate_threshold_(self, x: torch.Tensor, batch_size: int) -> None:
        """Set θ to the mean, over consecutive batches of ``batch_size`` rows of ``x`` (normalised), of the smallest
        positive code the batch selection keeps: the paper's estimate, from a sample instead of training batches."""
        smallest = [batch_topk(self.pre_activations(rows), self.k)[1] for rows in x.split(batch_size)]
        self.threshold.copy_(torch.stack(smallest).mean())

    def hparams(self) -> dict:
        return {**super().hparams(), "threshold_lr": self.threshold_lr}
