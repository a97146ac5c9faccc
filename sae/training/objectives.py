"""The training loss: the one place where a dictionary's terms become the number the optimiser minimises.

``reconstruction_loss`` is the paper's objective (``objective=mse``): in normalised units,
``loss = mse + w · sparsity + aux`` with ``mse`` the batch mean of ``||x − x_hat||²`` summed over dimensions, ``w``
the sparsity warm-up weight (0 → 1 over ``train.sparsity_warmup_frac`` of the run), ``sparsity`` the variant's
penalty with its coefficient, and ``aux`` its auxiliary term (AuxK for TopK).
"""

from __future__ import annotations

import torch

from sae.dictionaries import Dictionary

LOSS_DOC = (
    "activations are divided by normalisation.scale; mse = batch mean of ||x - x_hat||^2 summed over dimensions "
    "(normalised units); sparsity = the variant's penalty (ReLU: l1_coeff * batch mean of sum_i |c_i|, codes of "
    "unit-norm atoms; TopK: none); aux = the variant's auxiliary term (TopK: AuxK); "
    "loss = mse + w * sparsity + aux, w ramping from 0 to 1 over train.sparsity_warmup_frac of the run"
)


def reconstruction_loss(dictionary: Dictionary, x: torch.Tensor, dead: torch.Tensor | None = None,
                        sparsity_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss on normalised activations ``x`` ``[batch, d_in]`` and its terms (``mse``, ``sparsity``, ``aux``,
    and the dictionary's ``x_hat`` and detached ``codes``)."""
    terms = dictionary.train_terms(x, dead=dead)
    mse = (terms["x_hat"] - x).pow(2).sum(-1).mean()
    loss = mse + sparsity_weight * terms["sparsity"] + terms["aux"]
    return loss, {**terms, "mse": mse}
