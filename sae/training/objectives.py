"""The training loss: the one place where a dictionary's terms become the number the optimiser minimises.

``reconstruction_loss`` is the paper's objective (``objective=mse``): in normalised units,
``loss = mse + w · sparsity + aux`` with ``mse`` the batch mean of ``||x − x_hat||²`` summed over dimensions, ``w``
the sparsity warm-up weight (0 → 1 over ``train.sparsity_warmup_frac`` of the run), ``sparsity`` the variant's
penalty with its coefficient, and ``aux`` its auxiliary term (AuxK for TopK).

The end-to-end objectives (``objective=kl|kl_mse|e2e_ds``, ``Objective``) add the spliced LM's KL and downstream
error; ``sae.training.spliced`` runs the LM for them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# --- the end-to-end objectives (objective=kl | kl_mse | e2e_ds) -------------------------------------------------
OBJECTIVES = ("mse", "kl", "kl_mse", "e2e_ds")
SPLICES = ("each", "all")


@dataclass(frozen=True)
class Objective:
    """What the dictionaries minimise (the ``objective`` group; the one default of each setting: its YAML).

    ``mse`` is ``reconstruction_loss`` on shuffled activations. The others train on token contexts: the LM runs
    once clean and once with the dictionary's reconstruction spliced in (``sae.lm.splice``), and

    ``loss = kl_coeff · KL + mse_coeff · mse + w · sparsity + aux + downstream_coeff · downstream``

    with KL the per-token mean of KL(clean ‖ spliced) over every next-token prediction of the batch
    (``NextTokenScorer.kl_per_token``: ``kl_spliced``'s definition), ``mse``/``sparsity``/``aux`` as for ``mse`` on
    the clean activations at ordinary positions, and ``downstream`` the mean over the block outputs after the hook
    of the spliced activation's squared error against the clean one's, divided by the clean one's variance.
    """

    name: str
    splice: str
    kl_coeff: float
    mse_coeff: float
    downstream_coeff: float

    @classmethod
    def from_config(cls, cfg) -> Objective:
        return cls(
            str(cfg.name), str(cfg.splice), float(cfg.kl_coeff), float(cfg.mse_coeff), float(cfg.downstream_coeff)
        )

    @property
    def on_contexts(self) -> bool:
        """True when batches are token contexts run through the LM (every objective but ``mse``)."""
        return self.name != "mse"

    def doc(self) -> str:
        """``sae.json``'s description of the loss."""
        if not self.on_contexts:
            return LOSS_DOC
        return (
            f"objective={self.name} (splice={self.splice}): loss = {self.kl_coeff:g} * kl + {self.mse_coeff:g} * mse "
            f"+ w * sparsity + aux + {self.downstream_coeff:g} * downstream; kl = per-token mean of "
            "KL(clean || spliced) of next-token distributions over every next-token prediction (kl_spliced's "
            "definition); mse, sparsity, aux and w as for objective=mse, on the clean activations at ordinary "
            "positions; downstream = mean over the block outputs after the hook of ||a_spliced - a_clean||^2 / "
            "variance of a_clean"
        )

    def problems(self) -> list[str]:
        """This objective's own settings checked (the ones that need no model)."""
        found = []
        if self.name not in OBJECTIVES:
            found.append(f"unknown objective.name '{self.name}' (choose objective={'|'.join(OBJECTIVES)})")
        if self.splice not in SPLICES:
            found.append(f"objective.splice='{self.splice}' must be one of {', '.join(SPLICES)}")
        for key in ("kl_coeff", "mse_coeff", "downstream_coeff"):
            if getattr(self, key) < 0:
                found.append(f"objective.{key}={getattr(self, key)} must be >= 0")
        return found


def objective_loss(objective: Objective, terms: dict[str, torch.Tensor], x: torch.Tensor, kl: torch.Tensor,
                   downstream: torch.Tensor, sparsity_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An end-to-end objective's loss for one dictionary: its ``train_terms`` on the clean normalised
    activations ``x``, the spliced run's ``kl`` and ``downstream`` error (see ``Objective``)."""
    mse = (terms["x_hat"] - x).pow(2).sum(-1).mean()
    loss = (objective.kl_coeff * kl + objective.mse_coeff * mse + sparsity_weight * terms["sparsity"] + terms["aux"]
            + objective.downstream_coeff * downstream)
    return loss, {**terms, "mse": mse, "kl": kl, "downstream": downstream}
