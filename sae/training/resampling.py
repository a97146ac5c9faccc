"""Resampling: which atoms to re-seed, and with what (pure functions; ``TrainedDictionary.resample`` applies them).

As in Anthropic's "Towards Monosemanticity", atoms that do no work are pointed at inputs the dictionary
reconstructs badly. Two refinements make the re-seeded atoms land on structure no atom has found yet:

- *stale* atoms are the dead ones and the later of each pair of atoms more similar than ``duplicate_cos`` (a
  duplicate fires, so it is never dead, but it is capacity lost to the features no atom has found);
- an input's error is measured by what the dictionary cannot explain at all: the residual of a least-squares fit
  on the ``SUPPORT`` atoms the input is most aligned with, after greedily removing any atom the residual still
  points along (cosine above ``ALIGNED``). Plain reconstruction error is dominated by what the dictionary knows
  but shrinks (L1) or leaves out (TopK), which re-seeds atoms onto features that already have one.

The inputs are the dictionary's pool of recent training inputs. They are drawn with probability proportional to the
fourth power of that residual's norm, among those whose norm exceeds ``GATE`` times the median (or ``FLOOR`` times
the inputs' median norm, when the dictionary explains so little that nothing stands out): when nothing stands out,
fewer atoms are re-seeded (the rest stay stale until the next resampling) rather than being pointed at noise.
"""

from __future__ import annotations

import torch

from sae.dictionaries.base import Dictionary

SUPPORT = 32  # atoms in each input's least-squares fit (at most an eighth of the input width)
ALIGNED = 0.5  # an atom the residual has a larger cosine with is removed from it
GATE = 3.0  # candidates: unexplained norm above this multiple of the median ...
FLOOR = 0.5  # ... or, if lower, above this multiple of the inputs' median norm
RIDGE = 1e-4  # keeps each least-squares fit well posed
CHUNK = 1024  # inputs fitted at once (each holds SUPPORT atoms)


def duplicate_atoms(atoms: torch.Tensor, threshold: float, chunk: int = 4096) -> torch.Tensor:
    """Mask of atoms whose cosine similarity with a lower-indexed atom exceeds ``threshold`` (unit-norm rows)."""
    n = len(atoms)
    mask = torch.zeros(n, dtype=torch.bool, device=atoms.device)
    for start in range(0, n, chunk):
        cos = atoms[start : start + chunk] @ atoms.T  # [chunk, n]
        rows = torch.arange(start, min(start + chunk, n), device=atoms.device)
        cos[torch.arange(len(rows)), rows] = -1.0
        lower = torch.arange(n, device=atoms.device)[None, :] < rows[:, None]
        mask[rows] = (cos.masked_fill(~lower, -1.0) > threshold).any(dim=1)
    return mask


def stale_atoms(dead: torch.Tensor, atoms: torch.Tensor, duplicate_cos: float) -> torch.Tensor:
    """Indices of the atoms to re-seed: ``dead`` ones and duplicates (see the module docstring)."""
    return (dead | duplicate_atoms(atoms, duplicate_cos)).nonzero().squeeze(1)


def unexplained(x: torch.Tensor, atoms: torch.Tensor, b_dec: torch.Tensor, support: int = SUPPORT,
                aligned: float = ALIGNED, max_peel: int = 8) -> torch.Tensor:
    """``[batch, d]``: what of each (normalised) input no atom explains.

    The residual of a least-squares fit of ``x - b_dec`` on the ``support`` (at most ``d / 8``) unit-norm atoms
    with the largest projections, then, up to ``max_peel`` times, minus its projection on the atom it is most
    aligned with while that cosine exceeds ``aligned``.
    """
    centred = x - b_dec
    top = (centred @ atoms.T).topk(max(1, min(support, len(atoms), x.shape[-1] // 8)), dim=-1).indices
    basis = atoms[top]  # [batch, support, d]
    gram = basis @ basis.transpose(1, 2) + RIDGE * torch.eye(basis.shape[1], dtype=x.dtype, device=x.device)
    coef = torch.linalg.solve(gram, basis @ centred.unsqueeze(-1))  # [batch, support, 1]
    residual = centred - (coef.transpose(1, 2) @ basis).squeeze(1)
    for _ in range(max_peel):
        best, which = (residual @ atoms.T).max(dim=-1)
        peel = best > aligned * residual.norm(dim=-1)
        if not peel.any():
            break
        residual = residual - (best * peel).unsqueeze(-1) * atoms[which]
    return residual


def pick_inputs(norms: torch.Tensor, n: int, floor: float = float("inf"), gate: float = GATE,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of at most ``n`` distinct inputs, drawn with probability proportional to ``norms**4`` among those
    whose norm exceeds ``gate`` times the median, or ``floor`` if that is lower (fewer when fewer stand out)."""
    weights = norms.pow(4) * (norms > min(gate * norms.median().item(), floor))
    available = int((weights > 0).sum())
    if available == 0:
        return torch.zeros(0, dtype=torch.long, device=norms.device)
    return torch.multinomial(weights, min(n, available), replacement=False, generator=generator)


@torch.no_grad()
def resampling_plan(dictionary: Dictionary, x: torch.Tensor, dead: torch.Tensor, duplicate_cos: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(atoms, directions)``: the indices of the stale atoms to re-seed now and, one row each, the direction
    (normalised-activation units, any norm) to point each at, from the inputs ``x`` (normalised activations)."""
    atoms = dictionary.decoder_weight()
    stale = stale_atoms(dead, atoms, duplicate_cos)
    if len(stale) == 0:
        return stale, x.new_zeros(0, x.shape[-1])
    residual = torch.cat([unexplained(rows, atoms, dictionary.b_dec) for rows in x.split(CHUNK)])
    # A dictionary that explains little (most atoms dead, early training) leaves every input unexplained, so none
    # stands out from the median: then any input whose unexplained part is half its typical size is a candidate.
    floor = FLOOR * (x - dictionary.b_dec).norm(dim=-1).median().item()
    picks = pick_inputs(residual.norm(dim=-1).float().cpu(), len(stale), floor, generator=generator).to(x.device)
    return stale[: len(picks)], residual[picks]
