"""The interface every dictionary (and every later decomposition) shares, and the variant registry."""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import nn

VARIANTS: dict[str, type["Dictionary"]] = {}


def register(cls: type["Dictionary"]) -> type["Dictionary"]:
    """Class decorator: make a variant buildable by its ``variant`` name (``sae=<name>`` in the config)."""
    VARIANTS[cls.variant] = cls
    return cls


class Dictionary(nn.Module):
    """A sparse dictionary over ``d_in``-dimensional activations with ``n_features`` unit-norm atoms.

    ``encode``/``decode`` work in the model's own units on ``[..., d_in]`` tensors; inside, activations are
    divided by the scalar ``scale`` (set by ``init_from_data`` so that held-in activations have unit mean squared
    distance from their mean). Training works on normalised activations through ``train_terms``.
    """

    variant: ClassVar[str] = ""
    reseed_encoder_scale: ClassVar[float] = 1.0  # see ``reinit_atoms_``
    reseed_median_bias: ClassVar[bool] = True

    def __init__(self, d_in: int, n_features: int):
        super().__init__()
        self.d_in, self.n_features = d_in, n_features
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))

    # --- what a variant defines -------------------------------------------------------------------------
    def encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decoder_weight(self) -> torch.Tensor:
        """``[n_features, d_in]`` atoms of unit norm."""
        raise NotImplementedError

    def sparsity_loss(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.new_zeros(())

    def hparams(self) -> dict:
        """Constructor arguments beyond ``d_in`` and ``n_features``, as saved in ``sae.json``."""
        return {}

    # --- fusing: what a variant may define (``sae.dictionaries.fusing``) ----------------------------------
    def fuse_key(self) -> tuple | None:
        """What dictionaries of this variant, input width and size must also share to train as one stacked group
        (hyperparameters that set a shape or a code path, e.g. TopK's ``k``); scalar ones such as ``l1_coeff`` may
        differ. ``None``: the variant does not fuse (it trains alone in a set)."""
        return None

    @classmethod
    def stacked_train_terms(cls, dictionaries: list["Dictionary"], x: torch.Tensor,
                            dead: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``train_terms`` of ``G`` dictionaries of this variant at once, on their normalised inputs ``x`` ``[G, batch,
        d_in]`` (``dead``: ``[G, n_features]``): the terms with a leading ``G`` (``sparsity``, ``aux`` of shape
        ``[G]``), from the members' parameters stacked (``stacked``) and one batched product per product. A variant
        that fuses defines it, and its ``train_terms`` is the case ``G = 1``, so that a member computes alike alone and
        in a group."""
        raise NotImplementedError(f"variant '{cls.variant}' does not fuse")

    @torch.no_grad()
    def normalise_atoms_(self) -> None:
        """Set the stored decoder rows back to unit norm (the trainer calls this after every optimiser step).

        ``decoder_weight`` normalises ``W_dec``'s rows in the forward pass, so the gradient of a row has no
        component along it; but Adam's update is not along the gradient, and every step lengthens the rows a little
        (1.12–1.18× in 3,000 steps), which quietly lowers the learning rate of the directions. Rescaling a row does
        not change the function: for a variant whose atoms are the unit rows of ``W_dec`` this is the reference
        implementations' renormalisation. A variant whose decoder rows carry a norm of their own overrides it."""
        w = getattr(self, "W_dec", None)
        if isinstance(w, nn.Parameter):
            w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def atom_parameters(self) -> list[nn.Parameter]:
        """Parameters with one row per atom (reset together when atoms are resampled)."""
        return [p for p in (getattr(self, n, None) for n in ("W_dec", "W_enc", "b_enc")) if p is not None]

    @torch.no_grad()
    def reinit_atoms_(self, idx: torch.Tensor, directions: torch.Tensor) -> None:
        """Point atoms ``idx`` along ``directions`` (normalised activations) and give them a fresh encoder.

        The decoder row becomes the unit direction, an untied encoder row the same direction at
        ``reseed_encoder_scale`` times the mean norm of the live encoder rows, and the encoder bias the live atoms'
        median (``reseed_median_bias``, so the new atom fires about as selectively as a typical one) or 0. A tied
        encoder row is the unit atom itself.
        """
        unit = unit_rows(directions)
        alive = torch.ones(self.n_features, dtype=torch.bool, device=unit.device)
        alive[idx] = False
        self.W_dec[idx] = unit
        if "W_enc" in self._parameters:
            norm = self.W_enc[alive].norm(dim=-1).mean() if alive.any() else torch.tensor(1.0)
            self.W_enc[idx] = unit * self.reseed_encoder_scale * norm
        median = self.b_enc[alive].median() if alive.any() else 0.0
        self.b_enc[idx] = median if self.reseed_median_bias else 0.0

    # --- shared -----------------------------------------------------------------------------------------
    def decode_normalised(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.decoder_weight() + self.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., n_features]`` for activations ``[..., d_in]`` in the model's units."""
        return self.encode_normalised(x / self.scale)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` in the model's units."""
        return self.decode_normalised(codes) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def train_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What training needs of this dictionary on normalised activations ``x`` ``[batch, d_in]``.

        ``x_hat``: the reconstruction (with gradient); ``codes``: the codes (detached, for firing counts);
        ``sparsity``: the variant's penalty with its coefficient (``l1_coeff`` times the batch mean of the codes' L1
        norm for ReLU variants; the trainer ramps it in); ``aux``: an auxiliary term that may use the mask of
        ``dead`` features (AuxK for TopK, else 0). The objective (``sae.training.objectives``) turns these into the
        loss.
        """
        codes = self.encode_normalised(x)
        return {"x_hat": self.decode_normalised(codes), "codes": codes.detach(), "sparsity": self.sparsity_loss(codes),
                "aux": x.new_zeros(())}

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Set ``scale`` and ``b_dec`` from a sample ``[n, d_in]`` of raw activations."""
        mean = x.mean(0)
        self.scale.copy_((x - mean).pow(2).sum(-1).mean().sqrt().clamp_min(1e-8))
        self.b_dec.copy_(mean / self.scale)


def encoder_affine(weight: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """The bias of ``x @ weight.T + bias`` equal to ``(x - b_dec) @ weight.T + b_enc``.

    Folding ``b_dec`` into the bias spares the backward pass a ``[batch, n_features] @ [n_features, d_in]``
    product: the input needs no gradient, and ``b_dec``'s comes from this vector alone. Stacked (``weight`` ``[G, n,
    d]``, ``b_enc`` ``[G, n]``, ``b_dec`` ``[G, d]``) it is each member's.
    """
    if weight.dim() == 3:  # member by member: a batched product's sums depend on the batch (see ``plus_rows``)
        return torch.stack([encoder_affine(*member) for member in zip(weight, b_enc, b_dec)])
    return b_enc - weight @ b_dec


def stacked(dictionaries: list[Dictionary], name: str) -> torch.Tensor:
    """The members' parameter ``name`` stacked into ``[G, ...]``, with gradient to each member's own (one member:
    a view, no copy). Parameters stay stored per member, so saving, checkpoints and resampling do not change."""
    tensors = [getattr(d, name) for d in dictionaries]
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def scalars(dictionaries: list[Dictionary], name: str, like: torch.Tensor) -> torch.Tensor:
    """The members' scalar hyperparameter ``name`` as a ``[G]`` tensor (on ``like``'s device and dtype)."""
    return _constant(tuple(float(getattr(d, name)) for d in dictionaries), like.dtype, like.device)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Made once: a copy from the host at every step would wait on a GPU for all the queued work."""
    return torch.tensor(values, dtype=dtype, device=device)


class PlusRows(torch.autograd.Function):
    """``out + bias`` for ``out`` ``[G, batch, n]`` and a per-member ``bias`` ``[G, n]``, the bias's gradient summed
    over the batch member by member: the reduction of a broadcast (and a batched product) sums in an order that
    depends on ``G``, so this is what keeps a member's step bitwise the same alone and in a group."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return out + bias.unsqueeze(-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.stack([member.sum(0) for member in grad])


def plus_rows(out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``out + bias.unsqueeze(-2)``, exact per member (``PlusRows``)."""
    return PlusRows.apply(out, bias)


def unstacked(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A group of one's terms without the leading ``G``: a dictionary's own ``train_terms``."""
    return {key: value[0] for key, value in terms.items()}


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def random_atoms(n_features: int, d_in: int) -> torch.Tensor:
    return unit_rows(torch.randn(n_features, d_in))
