"""What a feature does to next-token logits: the direct path through the unembedding, and the causal effect of
ablating it."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from sae.lm.hooks import HookPoint, family_of
from sae.lm.reader import model_device
from sae.lm.splice import AddDelta, spliced_forward


def to_residual(model: nn.Module, hook: HookPoint, atoms: torch.Tensor) -> torch.Tensor:
    """``atoms`` ``[n, width]`` as residual-stream directions: MLP neurons go through the down projection (no bias).

    The projection runs in float32 on ``atoms``' device whatever the model's dtype (``model.dtype=bfloat16``): its
    weights are cast for this call only, so float32 atoms meet float32 weights."""
    if hook.site != "mlp":
        return atoms
    down = model.get_submodule(f"{family_of(model).blocks}.{hook.layer}.{family_of(model).mlp_down}")
    weights = {name: t.to(atoms.device, torch.float32) for name, t in down.named_parameters()}
    atoms = atoms.float()
    return functional_call(down, weights, (atoms,)) - functional_call(down, weights, (torch.zeros_like(atoms[:1]),))


@torch.no_grad()
def direct_logits(model: nn.Module, hook: HookPoint, atoms: torch.Tensor) -> torch.Tensor:
    """Direct path ``[n, vocab]``: each atom (model units) read straight into the unembedding, later blocks skipped.

    The final norm is linearised: the direction is centred (LayerNorm only) and multiplied by the norm's weight;
    the division by the token's own scale is left out, so only the logits' relative sizes are meaningful.
    """
    resid = to_residual(model, hook, atoms.float())
    norm = model.get_submodule(family_of(model).final_norm)
    if isinstance(norm, nn.LayerNorm):
        resid = resid - resid.mean(-1, keepdim=True)
    unembed = model.get_output_embeddings().weight
    return (resid * norm.weight.float()) @ unembed.float().T


@torch.no_grad()
def causal_logit_change(
    model: nn.Module, hook: HookPoint, atom: torch.Tensor, codes: torch.Tensor, input_ids: torch.Tensor,
    positions: torch.Tensor, special_ids: list[int],
) -> torch.Tensor:
    """Mean change ``[vocab]`` of the next-token logits at ``positions`` (one per context) when the feature is ablated.

    ``codes`` ``[n, seq]`` are the feature's codes on contexts ``input_ids`` ``[n, seq]``; its contribution
    ``code * atom`` (model units) is subtracted from the activation at ``hook`` (ordinary-text positions; the codes
    are 0 elsewhere). Only the positions asked for are unembedded.
    """
    device = model_device(model)
    end = int(positions.max()) + 1
    input_ids, positions = input_ids[:, :end], positions.to(device)
    at = (torch.arange(len(input_ids), device=device), positions)
    contribution = codes[:, :end, None].to(device) * atom.to(device)
    clean = spliced_forward(model, input_ids, {}, special_ids, at=at).logits.float()
    ablated = spliced_forward(model, input_ids, {hook: AddDelta(-contribution)}, special_ids, at=at).logits.float()
    return (ablated - clean).mean(0)
