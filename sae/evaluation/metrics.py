"""Reconstruction and sparsity metrics, MMCS, and the next-token CE and KL of spliced logits against clean ones."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sae.dictionaries import Dictionary, encode_parts
from sae.evaluation.saebench import CoreSums, preservation
from sae.io.checkpoints import dictionary_from_checkpoint
from sae.io.saving import load

DENSE_DENSITY = 0.1  # a feature firing on more than this fraction of tokens is dense
DENSITY_BINS = 24  # log10 feature-density histogram: bins between log10(1 / n_tokens) and 0
L0_BINS = 32


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, centred: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero codes per input."""
    return (codes != 0).float().sum(-1).mean()


def best_cosines(reference: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For each ``reference`` row, the maximum cosine similarity to any ``learned`` row."""
    cos = F.normalize(reference.float(), dim=-1) @ F.normalize(learned.float(), dim=-1).T
    return cos.max(dim=1).values


def mmcs(reference: torch.Tensor, learned: torch.Tensor) -> float:
    """Mean max cosine similarity: how well ``learned`` directions cover the ``reference`` ones (1 = all found)."""
    return best_cosines(reference, learned).mean().item()


def recovered_fraction(reference: torch.Tensor, learned: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of ``reference`` rows matched by a ``learned`` row with cosine similarity above ``threshold``."""
    return (best_cosines(reference, learned) > threshold).float().mean().item()


def dictionary_mmcs(a: Dictionary | str | Path, b: Dictionary | str | Path) -> float:
    """MMCS of ``a``'s atoms against ``b``'s: the paper's proxy for convergence when no ground truth exists
    (compare a dictionary with the next larger one). Dictionaries, run directories or training checkpoints
    (``<run>/checkpoints/*.ckpt``, a run's only dictionary)."""
    def resolve(x):
        if isinstance(x, Dictionary):
            return x
        return dictionary_from_checkpoint(x) if str(x).endswith(".ckpt") else load(x)

    a, b = resolve(a), resolve(b)
    with torch.no_grad():
        return mmcs(a.decoder_weight(), b.decoder_weight())


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product over the last dimension, ``[..., V] x [..., V] -> [...]``, as a batched matmul (no temporary)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


class NextTokenScorer:
    """Summed next-token CE of any logits, and KL(clean || them), against one batch's clean logits.

    Positions ``[:, :-1]`` predict ``input_ids[:, 1:]``. With clean logits c (log-sum-exp C, softmax p) and logits z
    (log-sum-exp L): CE = L - z[target] and KL = (L - C) sum p - sum p (z - c). Scoring costs one log-sum-exp and one
    dot product per position (the vocabulary-wide work dominates on a CPU); working with z - c keeps float32 exact
    enough for the small KLs of good reconstructions.
    """

    def __init__(self, clean_logits: torch.Tensor, input_ids: torch.Tensor):
        self.targets = input_ids[:, 1:].unsqueeze(-1)
        self.clean = clean_logits[:, :-1].float()
        self.clean_lse = torch.logsumexp(self.clean, -1)
        self.p = (self.clean - self.clean_lse.unsqueeze(-1)).exp()
        self.p_sum = self.p.sum(-1)

    def ce(self, logits: torch.Tensor) -> float:
        z = logits[:, :-1].float()
        return (torch.logsumexp(z, -1) - z.gather(-1, self.targets).squeeze(-1)).double().sum().item()

    def kl_per_token(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(clean || softmax(logits)) at every next-token prediction, ``[batch, seq - 1]``; differentiable in
        ``logits``. The KL training objective is this tensor's mean and ``kl_spliced`` its mean over held-out
        text: one definition."""
        z = logits[:, :-1].float()
        if not (torch.is_grad_enabled() and z.requires_grad):
            return self._kl(z, torch.logsumexp(z, -1))
        return _NextTokenKL.apply(z, self)

    def _kl(self, z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        return (lse - self.clean_lse) * self.p_sum - _row_dot(self.p, z - self.clean)

    def ce_and_kl(self, logits: torch.Tensor) -> tuple[float, float]:
        z = logits[:, :-1].float()
        lse = torch.logsumexp(z, -1)
        ce = (lse - z.gather(-1, self.targets).squeeze(-1)).double().sum().item()
        return ce, self._kl(z, lse).double().sum().item()


class _NextTokenKL(torch.autograd.Function):
    """``NextTokenScorer._kl`` with its gradient written out, d KL / d z = softmax(z) · sum p − p: one pass over
    the vocabulary in the backward instead of autograd's several (the KL objective's step is vocabulary-bound)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, scorer: NextTokenScorer) -> torch.Tensor:
        lse = torch.logsumexp(z, -1)
        ctx.save_for_backward(z, lse)
        ctx.scorer = scorer
        return scorer._kl(z, lse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, lse = ctx.saved_tensors
        s = ctx.scorer
        dz = (z - lse.unsqueeze(-1)).exp_().mul_(s.p_sum.unsqueeze(-1)).sub_(s.p).mul_(grad.unsqueeze(-1))
        return dz, None


ROWS_PER_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 28}  # logits per chunk of the hidden-state paths


def chunk_rows(weight: torch.Tensor) -> int:
    """Positions per chunk when unembedding with ``weight`` ``[vocab, d]``: ``ROWS_PER_CHUNK_ELEMENTS`` logits."""
    return max(1, ROWS_PER_CHUNK_ELEMENTS["cuda" if weight.is_cuda else "cpu"] // weight.shape[0])


class _CleanChunk:
    """A chunk of clean next-token logits ``c`` ``[n, vocab]`` (float32): its softmax p (each exp formed once),
    log-sum-exp and Σp; and how the logits z = c + δ of another run at the same positions compare with it, from
    δ = (h − h_clean) @ weight.T alone (the bias cancels; z is never formed): lse(z) − lse(c) = log Σ p e^δ − log Σp,
    one exponential pass and two dot products per row, and an exact 0 where the hidden states are the same."""

    def __init__(self, c: torch.Tensor):
        self.c = c
        c_max = c.amax(-1, keepdim=True)
        self.p = (c - c_max).exp_()
        c_sum = self.p.sum(-1, keepdim=True)
        self.p.div_(c_sum)
        self.p_sum = _row_dot(self.p, torch.ones_like(self.p))  # summed as Σ p e^δ is: δ = 0 gives a gap of 0
        self.lse = (c_max + c_sum.log()).squeeze(-1)

    def compare(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For z = c + ``delta``: the gap lse(z) − lse(c) ``[n]``, Σ p δ ``[n]``, and e = exp(δ − max δ)
        ``[n, vocab]`` (in ``delta``'s storage, which is overwritten) with S = Σ p e ``[n]``: softmax(z) = p e / S."""
        p_delta = _row_dot(self.p, delta)
        shift = delta.amax(-1, keepdim=True)
        e = delta.sub_(shift).exp_()
        s = _row_dot(self.p, e)
        return shift.squeeze(-1) + s.log() - self.p_sum.log(), p_delta, e, s

    def kl(self, gap: torch.Tensor, p_delta: torch.Tensor) -> torch.Tensor:
        """KL(clean || softmax(z)) per row, ``NextTokenScorer._kl``: (lse(z) − lse(c)) Σp − Σ p (z − c)."""
        return gap * self.p_sum - p_delta


def kl_from_hidden(hidden: torch.Tensor, clean_hidden: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``NextTokenScorer(clean logits).kl_per_token(spliced logits)`` from the final hidden states instead of the
    logits (``logits = hidden @ weight.T + bias``): ``[batch, seq - 1]``, differentiable in ``hidden``.

    The same per-token KL, computed a chunk of positions at a time: each chunk's clean and spliced logits, the KL
    and its gradient d KL / d hidden = (softmax(z) · Σp − p) @ weight are formed while the chunk is in cache, and
    only the ``[positions, d_model]`` gradient is kept for the backward. On a CPU, where the vocabulary-wide
    element-wise passes over ``[positions, vocab]`` tensors cost as much as the three products, this halves the
    KL objective's step; no ``[positions, vocab]`` tensor outlives its chunk. Identical hidden states give
    bit-identical logits (both products run on the same chunk shape), so unspliced positions add exactly 0."""
    batch, seq = hidden.shape[0], hidden.shape[1] - 1
    flat = hidden[:, :-1].reshape(batch * seq, -1)
    clean = clean_hidden[:, :-1].reshape(batch * seq, -1)
    return _HiddenStateKL.apply(flat, clean, weight, bias, chunk_rows(weight)).view(batch, seq)


class _HiddenStateKL(torch.autograd.Function):
    """``kl_from_hidden``'s chunked forward, which also forms the gradient; the backward only scales it."""

    @staticmethod
    def forward(ctx, hidden, clean, weight, bias, rows):
        kl = hidden.new_empty(len(hidden), dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for start in range(0, len(hidden), rows):
            part = slice(start, start + rows)
            chunk = _CleanChunk(F.linear(clean[part], weight, bias).float())
            gap, p_delta, e, s = chunk.compare(F.linear(hidden[part] - clean[part], weight).float())
            kl[part] = chunk.kl(gap, p_delta)
            dz = e.mul_(chunk.p).mul_((chunk.p_sum / s).unsqueeze(-1)).sub_(chunk.p)  # softmax(z) Σp − p
            grad[part] = (dz.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    def backward(ctx, kl_grad):
        (grad,) = ctx.saved_tensors
        return grad * kl_grad.unsqueeze(-1).to(grad.dtype), None, None, None, None


@dataclass
class NextTokenLosses:
    """Summed next-token CE of a batch's clean run, and per other run its summed CE and KL(clean || it)."""

    ce_clean: float
    ce: list[float]
    kl: list[float]


def losses_from_logits(clean: torch.Tensor, others: Iterable[torch.Tensor], input_ids: torch.Tensor) -> NextTokenLosses:
    """``NextTokenLosses`` from full logits ``[batch, seq, vocab]`` (a head that is not a plain linear map); each
    of ``others`` is scored as it comes, so one spliced run's logits at a time are held beside the clean ones."""
    scorer = NextTokenScorer(clean, input_ids)
    scores = [scorer.ce_and_kl(logits) for logits in others]
    return NextTokenLosses(scorer.ce(clean), [ce for ce, _ in scores], [kl for _, kl in scores])


def losses_from_hidden(clean: torch.Tensor, others: list[torch.Tensor], input_ids: torch.Tensor,
                       weight: torch.Tensor, bias: torch.Tensor | None = None) -> NextTokenLosses:
    """``losses_from_logits`` of the logits ``hidden @ weight.T + bias``, from the final hidden states
    ``[batch, seq, d]``, a chunk of positions at a time: no ``[positions, vocab]`` tensor outlives its chunk.

    Per chunk, the clean run's and every other run's hidden states at those positions go through one product
    (the unembedding is read once per chunk for all runs) and one in-place log-softmax; then CE = −log q[target]
    and KL(clean || q) = Σ p log p − Σ p log q, with p = exp(log p) the clean distribution, each Σ a summed
    product over the vocabulary (no log-sum-exp or exponential pass per run). A run whose hidden state equals the
    clean one at a position has exactly the clean CE and a KL of 0 there."""
    flat = torch.stack([h[:, :-1].reshape(-1, h.shape[-1]) for h in (clean, *others)], 1)  # [positions, runs, d]
    targets = input_ids[:, 1:].reshape(-1, 1, 1).to(clean.device)
    ce = torch.zeros(flat.shape[1], dtype=torch.float64, device=clean.device)
    kl = torch.zeros(len(others), dtype=torch.float64, device=clean.device)
    rows = max(1, chunk_rows(weight) // flat.shape[1])
    for start in range(0, len(flat), rows):
        hidden = flat[start : start + rows]
        log_q = F.linear(hidden, weight, bias).float()  # [n, runs, vocab]
        torch.log_softmax(log_q, -1, out=log_q)
        run_ce = -log_q.gather(-1, targets[start : start + rows].expand(-1, flat.shape[1], 1)).squeeze(-1)
        p = log_q[:, :1].exp()
        p_log_q = log_q.mul_(p).sum(-1).double()  # [n, runs]: Σ p log q
        same = (hidden[:, 1:] == hidden[:, :1]).all(-1)
        run_ce[:, 1:] = torch.where(same, run_ce[:, :1], run_ce[:, 1:])
        ce += run_ce.double().sum(0)
        kl += (p_log_q[:, :1] - p_log_q[:, 1:]).masked_fill_(same, 0.0).sum(0)
    ce, kl = ce.tolist(), kl.tolist()
    return NextTokenLosses(ce[0], ce[1:], kl)


def histogram(values: torch.Tensor, bins: int, low: float, high: float) -> dict[str, list[float]]:
    """Equal-width histogram of ``values`` over ``[low, high]``, as JSON-ready ``edges`` and ``counts``."""
    counts, edges = torch.histogram(values.double().cpu(), bins=bins, range=(low, high))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def density_summary(fired: torch.Tensor, n_tokens: int) -> dict:
    """Dead and dense fractions and the log10 density histogram of features that fired ``fired`` times."""
    density = fired.double() / n_tokens
    live = density[density > 0]
    return {
        "dead_frac": (density == 0).double().mean().item(),
        "dense_frac": (density > DENSE_DENSITY).double().mean().item(),
        "log10_density_hist": histogram(live.log10(), DENSITY_BINS, -math.log10(n_tokens), 0.0),
    }


class Moments:
    """Running sums for centred FVU over many batches (float64)."""

    def __init__(self):
        self.n, self.sum_x, self.sum_sq, self.sum_err = 0, 0.0, 0.0, 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64 = x.double()
        self.n += len(x)
        self.sum_x = self.sum_x + x64.sum(0)
        self.sum_sq += x64.pow(2).sum().item()
        self.sum_err += (x64 - x_hat.double()).pow(2).sum().item()

    def fvu(self) -> float:
        total_var = self.sum_sq - (self.sum_x.pow(2).sum() / self.n).item()
        return self.sum_err / max(total_var, 1e-12)


class Tally:
    """One dictionary's running sums over held-out batches: reconstruction, sparsity and spliced-LM loss."""

    def __init__(self, dictionary: Dictionary, device: torch.device):
        self.dictionary = dictionary.to(device)
        self.moments = Moments()
        self.sq_err_norm, self.cosine, self.l2_ratio, self.ce, self.kl = 0.0, 0.0, 0.0, 0.0, 0.0
        self.nonzero = 0  # inputs with a direction: cosine and l2_ratio are averaged over these
        self.l0s: list[torch.Tensor] = []
        self.fired = torch.zeros(dictionary.n_features, device=device)
        self.saebench = CoreSums(dictionary.n_features)  # SAEBench's core metrics, by its definitions

    def add_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """Add ``x`` ``[n, d_in]`` (model units) and its reconstruction to the sums; return the reconstruction. The
        codes are encoded in row parts of bounded size (``encode_parts``: a batch's ``[n, n_features]`` codes are
        1 GiB at 8,192 positions and 32,768 features), their terms summed part by part."""
        x_hat = torch.cat([self._add_codes(codes) for _, codes in encode_parts(self.dictionary, x)])
        self.moments.add(x, x_hat)
        self.sq_err_norm += ((x - x_hat) / self.dictionary.scale).pow(2).sum().item()
        norms = x.norm(dim=-1)
        has_direction = norms > 0  # an all-zero input (a toy sample where nothing fires) has no ratio or angle
        self.nonzero += int(has_direction.sum())
        self.cosine += F.cosine_similarity(x_hat, x, dim=-1)[has_direction].sum().item()
        self.l2_ratio += (x_hat.norm(dim=-1) / norms)[has_direction].sum().item()
        self.saebench.add(x, x_hat)
        return x_hat

    def _add_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Add a row part's code terms (L0, firings, SAEBench's); return its reconstruction."""
        active = codes != 0
        self.l0s.append(active.sum(-1).cpu())
        self.fired += active.sum(0)
        self.saebench.add_codes(codes)
        return self.dictionary.decode_sparse(codes)

    def reconstruction_summary(self) -> dict:
        n = self.moments.n
        l0s = torch.cat(self.l0s).double()
        return {
            "mse": self.sq_err_norm / n,
            "fvu": self.moments.fvu(),
            "cosine": self.cosine / max(self.nonzero, 1),
            "l2_ratio": self.l2_ratio / max(self.nonzero, 1),
            "l0": l0s.mean().item(),
            **density_summary(self.fired, n),
            "n_tokens": n,
            "l0_hist": histogram(l0s, L0_BINS, 0.0, max(l0s.max().item(), 1.0)),
        }

    def summary(self, hook_metrics: dict[str, float], n_pred: int) -> dict:
        """Every held-out metric; ``hook_metrics``: the ones shared by the hook's dictionaries (``ce_clean``,
        ``ce_zero_ablation``, ``ce_mean_ablation``, ``kl_zero_ablation``, ``kl_mean_ablation``: means per
        next-token prediction)."""
        spliced, clean, zero = self.ce / n_pred, hook_metrics["ce_clean"], hook_metrics["ce_zero_ablation"]
        return {
            **self.reconstruction_summary(),
            "ce_clean": clean,
            "ce_spliced": spliced,
            "ce_zero_ablation": zero,
            "ce_mean_ablation": hook_metrics["ce_mean_ablation"],
            "ce_loss_recovered": (zero - spliced) / (zero - clean),
            "kl_spliced": self.kl / n_pred,
            "kl_zero_ablation": hook_metrics["kl_zero_ablation"],
            "kl_mean_ablation": hook_metrics["kl_mean_ablation"],
            "ppl_clean": math.exp(clean),
            "ppl_spliced": math.exp(spliced),
            "n_predictions": n_pred,
            "saebench": {**preservation(hook_metrics, spliced, self.kl / n_pred), **self.saebench.metrics()},
        }


@torch.no_grad()
def reconstruction_metrics(dictionary: Dictionary, x: torch.Tensor) -> dict:
    """The reconstruction and sparsity part of the held-out metrics, on activations ``x`` ``[n, d_in]``."""
    tally = Tally(dictionary, x.device)
    tally.add_reconstruction(x)
    return tally.reconstruction_summary()
