"""The encoder side of SAELens' ``jumprelu`` and ``gated`` architectures, in both directions (``sae.io.saelens`` does
the decoder, the scale and the files).

SAELens: ``jumprelu`` codes = ReLU(pre) · [pre > threshold], pre = (x − b_dec) @ W_enc + b_enc; ``gated`` codes =
[(x − b_dec) @ W_enc + b_gate > 0] · ReLU((x − b_dec) @ (W_enc · exp(r_mag)) + b_mag). Importing moves each decoder
row's norm into its code (code i times ``ratio[i]`` = its norm over the mean norm, ``sae.io.saelens``), so thresholds
and biases are multiplied by ``ratio`` too and the set of active codes is unchanged; ``r_mag`` needs nothing, as
both paths scale alike. Our export has unit-norm rows times ``scale``, so ``ratio`` is 1 and the codes are ours.
BatchTopK and Matryoshka dictionaries export as the JumpReLU they are at inference (SAELens saves its own BatchTopK
SAEs the same way), with their one global threshold given to every feature; importing that back gives a
``jumprelu`` dictionary with the same codes and reconstructions. SAELens' inference files do not record how they
were trained, so an imported dictionary's training settings are recorded as off (no sparsity penalty; JumpReLU's
kernel bandwidth and starting threshold at SAELens' own defaults, 0.001), see ``INFERENCE_SETTINGS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sae.dictionaries import Dictionary, build
from sae.dictionaries.topk import TopKDictionary
from sae.errors import ConfigError

# what an imported (inference-only) dictionary records as its training settings
INFERENCE_SETTINGS = {"jumprelu": {"l0_coeff": 0.0, "bandwidth": 0.001, "init_threshold": 0.001},
                      "gated": {"l1_coeff": 0.0}}


def _centred_bias(
    bias: torch.Tensor, w: dict[str, torch.Tensor], apply_b_dec: bool, factor: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """``bias`` for ``(x − b_dec) @ W_enc·factor`` equal to SAELens' ``x @ W_enc·factor + bias`` when it does not
    subtract ``b_dec`` from its input."""
    return bias if apply_b_dec else bias + (w["b_dec"] @ w["W_enc"]) * factor


def import_jumprelu(
    w: dict[str, torch.Tensor], norms: torch.Tensor, ratio: torch.Tensor, apply_b_dec: bool
) -> Dictionary:
    """A ``jumprelu`` dictionary with SAELens' encoder; a threshold ≤ 0 is 0 (ReLU keeps only positive codes anyway)."""
    d_in, d_sae = w["W_enc"].shape
    dictionary = build("jumprelu", d_in, d_sae, **INFERENCE_SETTINGS["jumprelu"])
    dictionary.W_enc.copy_(w["W_enc"].T * norms[:, None])
    dictionary.b_enc.copy_(_centred_bias(w["b_enc"], w, apply_b_dec) * ratio)
    dictionary.log_threshold.copy_((w["threshold"].clamp_min(0) * ratio).log())
    return dictionary


def import_gated(w: dict[str, torch.Tensor], norms: torch.Tensor, ratio: torch.Tensor, apply_b_dec: bool) -> Dictionary:
    d_in, d_sae = w["W_enc"].shape
    dictionary = build("gated", d_in, d_sae, **INFERENCE_SETTINGS["gated"])
    dictionary.W_enc.copy_(w["W_enc"].T * norms[:, None])
    dictionary.r_mag.copy_(w["r_mag"])
    dictionary.b_gate.copy_(_centred_bias(w["b_gate"], w, apply_b_dec) * ratio)
    dictionary.b_mag.copy_(_centred_bias(w["b_mag"], w, apply_b_dec, w["r_mag"].exp()) * ratio)
    return dictionary


def export_jumprelu(dictionary: Dictionary) -> tuple[str, dict[str, torch.Tensor]]:
    if dictionary.variant == "jumprelu":
        threshold = dictionary.threshold()
    else:  # BatchTopK, Matryoshka: one global threshold
        threshold = dictionary.threshold.expand(dictionary.n_features)
    return "jumprelu", {
        "W_enc": (dictionary.W_enc.T / dictionary.scale).contiguous(),
        "b_enc": dictionary.b_enc.detach().clone(),
        "threshold": threshold.detach().clone().contiguous(),
    }


def export_gated(dictionary: Dictionary) -> tuple[str, dict[str, torch.Tensor]]:
    return "gated", {
        "W_enc": (dictionary.W_enc.T / dictionary.scale).contiguous(),
        **{name: getattr(dictionary, name).detach().clone() for name in ("b_gate", "b_mag", "r_mag")},
    }


class RankedTopKDictionary(TopKDictionary):
    """SAELens' TopK with ``rescale_acts_by_decoder_norm: false`` and decoder rows of unequal norm, imported.

    SAELens keeps the ``k`` largest of its own pre-activations; ours are those times ``rank_scale`` (each row's
    norm over the mean norm), so this ranks ours divided by ``rank_scale`` and keeps our values: the same ``k``
    atoms, codes times ``rank_scale``, SAELens' reconstruction. Inference only: SAELens' files do not say how to
    train it, and our TopK training ranks unit-norm atoms as ``TopKDictionary`` does. Not a registered variant
    (``sae=`` cannot choose it); it is rebuilt from its SAELens directory each time it is read.
    """

    def __init__(self, d_in: int, n_features: int, *, k: int, rank_scale: torch.Tensor):
        super().__init__(d_in, n_features, k=k, aux_coeff=0.0, k_aux=None)
        self.register_buffer("rank_scale", rank_scale.detach().clone())

    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        indices = torch.relu(pre / self.rank_scale).topk(self.k, dim=-1, sorted=False).indices
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(pre).gather(-1, indices))

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise ConfigError("a SAELens TopK dictionary that ranks by its unnormalised pre-activations "
                          "(rescale_acts_by_decoder_norm: false, unequal decoder norms) is imported for inference only")


Importer = Callable[[dict, torch.Tensor, torch.Tensor, bool], Dictionary]
IMPORTERS: dict[str, Importer] = {"jumprelu": import_jumprelu, "gated": import_gated}
EXPORTERS: dict[str, Callable[[Dictionary], tuple[str, dict]]] = {
    "jumprelu": export_jumprelu, "batchtopk": export_jumprelu, "matryoshka": export_jumprelu, "gated": export_gated,
}
