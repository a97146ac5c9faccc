"""Gated dictionaries (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"):
*which* features fire and *how much* are estimated by two paths sharing one encoder matrix, so the L1 penalty that
decides the first no longer shrinks the second.

With z = W_enc (x − b_dec):

- gate: π_gate = z + b_gate, f_gate = H(π_gate);
- magnitude: π_mag = exp(r_mag) ⊙ z + b_mag (W_enc's rows rescaled per feature), f_mag = ReLU(π_mag);
- codes = f_gate ⊙ f_mag, x_hat = W_dec^T codes + b_dec.

H passes no gradient, so the gate learns from its own two terms: the L1 penalty ``l1_coeff`` × batch mean of
Σᵢ ReLU(π_gate)ᵢ ‖dᵢ‖ (our atoms dᵢ are unit-norm, so the decoder norms are 1), and the auxiliary reconstruction
‖x − (W_dec^T ReLU(π_gate) + b_dec)‖² through a *frozen* copy of the decoder (no gradient to W_dec or b_dec), which
keeps the gate's pre-activations on the scale of real codes.
"""

from __future__ import annotations

import torch
from torch import nn

from sae.dictionaries.base import Dictionary, random_atoms, register, unit_rows
from sae.errors import ConfigError


@register
class GatedDictionary(Dictionary):
    """Gate and magnitude paths over one encoder matrix (module docstring); loss = mse + L1(gate) + aux."""

    variant = "gated"

    def __init__(self, d_in: int, n_features: int, *, l1_coeff: float):
        if l1_coeff < 0:
            raise ConfigError(f"sae.l1_coeff={l1_coeff} must be >= 0")
        super().__init__(d_in, n_features)
        self.l1_coeff = l1_coeff
        self.W_dec = nn.Parameter(random_atoms(n_features, d_in))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())
        self.b_gate = nn.Parameter(torch.zeros(n_features))
        self.b_mag = nn.Parameter(torch.zeros(n_features))
        self.r_mag = nn.Parameter(torch.zeros(n_features))

    def pre_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(π_gate, π_mag)``, from one product: z = x W_enc^T − W_enc b_dec."""
        z = x @ self.W_enc.T - self.W_enc @ self.b_dec
        return z + self.b_gate, z * self.r_mag.exp() + self.b_mag

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        gate, mag = self.pre_activations(x)
        return (gate > 0) * torch.relu(mag)

    def decoder_weight(self) -> torch.Tensor:
        return unit_rows(self.W_dec)

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        gate, mag = self.pre_activations(x)
        atoms = self.decoder_weight()
        codes = (gate > 0) * torch.relu(mag)
        x_hat = codes @ atoms + self.b_dec
        gate_codes = torch.relu(gate)
        sparsity = self.l1_coeff * gate_codes.sum(-1).mean()  # decoder norms are 1
        via_gate = gate_codes @ atoms.detach() + self.b_dec.detach()
        aux = (via_gate - x).pow(2).sum(-1).mean()
        return {"x_hat": x_hat, "codes": codes.detach(), "sparsity": sparsity, "aux": aux}

    def atom_parameters(self) -> list[nn.Parameter]:
        return [self.W_dec, self.W_enc, self.b_gate, self.b_mag, self.r_mag]

    @torch.no_grad()
    def reinit_atoms_(self, idx: torch.Tensor, directions: torch.Tensor) -> None:
        """Decoder row the unit direction, encoder row along it at the mean live encoder norm, and ``b_gate``,
        ``b_mag``, ``r_mag`` the live atoms' medians: the new atom starts like a typical live one."""
        unit = unit_rows(directions)
        alive = torch.ones(self.n_features, dtype=torch.bool, device=unit.device)
        alive[idx] = False
        self.W_dec[idx] = unit
        norm = self.W_enc[alive].norm(dim=-1).mean() if alive.any() else torch.tensor(1.0)
        self.W_enc[idx] = unit * norm
        for param in (self.b_gate, self.b_mag, self.r_mag):
            param[idx] = param[alive].median() if alive.any() else 0.0

    def hparams(self) -> dict:
        return {"l1_coeff": self.l1_coeff}
