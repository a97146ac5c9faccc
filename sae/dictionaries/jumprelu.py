"""JumpReLU dictionaries (Rajamanoharan et al. 2024, "Jumping Ahead"): a learned threshold per feature, trained
with an L0 penalty through straight-through estimators.

codes = pre · H(pre − θ) with pre = W_enc (x − b_dec) + b_enc and θ = exp(log_threshold) > 0 per feature. The
Heaviside step H has no useful gradient, so θ learns through pseudo-derivatives with a rectangle kernel
K(u) = 1[|u| < 1/2] of bandwidth ε (``bandwidth``):

- JumpReLU: ∂/∂pre = H(pre − θ) (the true derivative), ∂/∂θ = −(θ/ε) K((pre − θ)/ε);
- the step in the L0 count: ∂/∂pre = 0, ∂/∂θ = −(1/ε) K((pre − θ)/ε).

The penalty is ``l0_coeff`` × the batch mean of the number of active codes, so θ rises where a feature's small
activations cost more in L0 than they buy in reconstruction, and falls where it cuts off useful ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sae.dictionaries.base import Dictionary, encoder_affine, random_atoms, register, unit_rows
from sae.errors import ConfigError


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel 1[−1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """``pre · H(pre − threshold)``; gradients as in the module docstring (``threshold`` ``[n]``, ``pre``
    ``[batch, n]``)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = (-(threshold / eps) * rectangle((pre - threshold) / eps) * grad).sum(0)
        return grad_pre, grad_threshold, None


class Step(torch.autograd.Function):
    """``H(pre − threshold)``; no gradient to ``pre``, the rectangle pseudo-derivative to ``threshold``."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1 / eps) * rectangle((pre - threshold) / eps) * grad).sum(0), None


@register
class JumpReLUDictionary(Dictionary):
    """codes = pre · H(pre − θ), θ = exp(log_threshold); x_hat = W_dec^T codes + b_dec; loss = mse + l0_coeff · L0.

    ``init_threshold`` is θ's starting value for every feature, ``bandwidth`` the ε of the pseudo-derivatives,
    both in normalised units (where a unit atom's code is the input's projection on it).
    """

    variant = "jumprelu"

    def __init__(self, d_in: int, n_features: int, *, l0_coeff: float, bandwidth: float, init_threshold: float):
        if l0_coeff < 0 or bandwidth <= 0 or init_threshold <= 0:
            raise ConfigError(f"sae.l0_coeff={l0_coeff} must be >= 0, sae.bandwidth={bandwidth} and "
                              f"sae.init_threshold={init_threshold} > 0")
        super().__init__(d_in, n_features)
        self.l0_coeff, self.bandwidth, self.init_threshold = l0_coeff, bandwidth, init_threshold
        self.W_dec = nn.Parameter(random_atoms(n_features, d_in))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.log_threshold = nn.Parameter(torch.full((n_features,), math.log(init_threshold)))

    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc.T + encoder_affine(self.W_enc, self.b_enc, self.b_dec)

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre * (pre > self.threshold())

    def decoder_weight(self) -> torch.Tensor:
        return unit_rows(self.W_dec)

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pre, threshold = self.pre_activations(x), self.threshold()
        codes = JumpReLU.apply(pre, threshold, self.bandwidth)
        x_hat = codes @ self.decoder_weight() + self.b_dec
        l0 = Step.apply(pre, threshold, self.bandwidth).sum(-1).mean()
        return {"x_hat": x_hat, "codes": codes.detach(), "sparsity": self.l0_coeff * l0, "aux": x.new_zeros(())}

    def atom_parameters(self) -> list[nn.Parameter]:
        return [*super().atom_parameters(), self.log_threshold]

    @torch.no_grad()
    def reinit_atoms_(self, idx: torch.Tensor, directions: torch.Tensor) -> None:
        """As for ReLU atoms (``Dictionary.reinit_atoms_``), and the threshold the live atoms' median."""
        alive = torch.ones(self.n_features, dtype=torch.bool, device=idx.device)
        alive[idx] = False
        super().reinit_atoms_(idx, directions)
        self.log_threshold[idx] = self.log_threshold[alive].median() if alive.any() else math.log(self.init_threshold)

    def hparams(self) -> dict:
        return {"l0_coeff": self.l0_coeff, "bandwidth": self.bandwidth, "init_threshold": self.init_threshold}
