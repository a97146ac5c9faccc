"""``evaluate.py analysis=residue``: the held-out tokens no dictionary explains.

Per dictionary, the LM runs over the held-out text clean and with the reconstruction spliced in, and every
next-token prediction gets its KL(clean ‖ spliced) (``NextTokenScorer.kl_per_token``: the per-token terms whose
mean is ``kl_spliced``). The ``top`` highest are written with their context, the clean and spliced top predictions
and the reconstruction's FVU at the token (its squared error over the held-out activations' mean squared
distance from their mean), as ``<out>/residue/<name>/tokens.jsonl`` and a page ``index.html``; ``summary.json``
says how concentrated the KL is: the share of the total carried by the top ``share_frac`` of the tokens.

The prediction at position t is made from the activations at positions <= t; the token "at" a record is the one
at t (whose activation the dictionary reconstructed), ``next_token`` the one predicted.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from sae.evaluation.config import ResidueSettings
from sae.evaluation.entries import Entry, eval_tokens, groups, session_for
from sae.evaluation.metrics import NextTokenScorer
from sae.evaluation.studies import settings_of
from sae.io.atomic import write_json, write_text
from sae.lm.hooks import HookPoint
from sae.lm.model import resolve_device
from sae.lm.reader import model_device, token_mask
from sae.lm.splice import Reconstruct, spliced_forward


def settings_problems(settings: ResidueSettings) -> list[str]:
    """The range checks of ``analysis=residue`` (Hydra has checked the types)."""
    problems = [f"analysis.{key}={getattr(settings, key)} must be a whole number >= 1"
                for key in ("top", "predictions", "batch_size") if getattr(settings, key) < 1]
    if settings.window < 0:
        problems.append(f"analysis.window={settings.window} must be a whole number >= 0")
    if not 0 < settings.share_frac <= 1:
        problems.append(f"analysis.share_frac={settings.share_frac} must be in (0, 1]")
    return problems


@dataclass
class TokenScores:
    """Per next-token prediction of ``contexts`` ``[n, length]`` (``[n, length - 1]`` each): the KL, the FVU of the
    reconstruction at the predicting position, and the clean and spliced top predictions (ids and probabilities,
    ``[n, length - 1, predictions]``)."""

    contexts: torch.Tensor
    kl: torch.Tensor
    fvu: torch.Tensor
    clean_ids: torch.Tensor
    clean_p: torch.Tensor
    spliced_ids: torch.Tensor
    spliced_p: torch.Tensor


@torch.no_grad()
def token_scores(model: nn.Module, dictionary: nn.Module, hook: HookPoint, contexts: torch.Tensor,
                 special_ids: list[int], batch_size: int, predictions: int) -> TokenScores:
    """Score every next-token prediction of ``contexts`` with ``dictionary`` spliced in at ``hook``."""
    device = model_device(model)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("kl", "err", "ci", "cp", "si", "sp")}
    count, squares, total = 0, 0.0, 0.0  # ordinary positions' activations: count, sum of |x|^2, sum of x
    for start in range(0, len(contexts), batch_size):
        ids = contexts[start : start + batch_size].to(device)
        keep = token_mask(ids, special_ids)
        clean = spliced_forward(model, ids, {}, special_ids, read=[hook])
        x = clean.activations[hook]
        x_hat = Reconstruct(dictionary)(x, keep)
        spliced = spliced_forward(model, ids, {hook: Reconstruct(dictionary)}, special_ids).logits
        parts["kl"].append(NextTokenScorer(clean.logits, ids).kl_per_token(spliced).clamp_min(0).cpu())
        parts["err"].append((x.float() - x_hat.float()).pow(2).sum(-1)[:, :-1].cpu())
        rows = x[keep].double()
        count, squares, total = count + len(rows), squares + rows.pow(2).sum().item(), total + rows.sum(0).cpu()
        for (i, p), logits in ((("ci", "cp"), clean.logits), (("si", "sp"), spliced)):
            top = logits[:, :-1].float().softmax(-1).topk(predictions, dim=-1)
            parts[i].append(top.indices.cpu())
            parts[p].append(top.values.cpu())
    n = max(count, 1)  # the FVU's denominator: the activations' mean squared distance from their mean
    variance = max(squares / n - (total / n).pow(2).sum().item(), 1e-12)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return TokenScores(contexts.cpu(), cat["kl"], cat["err"] / variance, cat["ci"], cat["cp"], cat["si"], cat["sp"])


def top_share(kl: torch.Tensor, frac: float) -> float:
    """The share of the total KL carried by the highest ``frac`` of the predictions (at least one)."""
    flat = kl.flatten().double()
    k = max(1, math.ceil(frac * flat.numel()))
    total = flat.sum().item()
    return flat.topk(k).values.sum().item() / total if total > 0 else 0.0


def top_records(scores: TokenScores, top: int, window: int, tokenizer) -> list[dict]:
    """The ``top`` predictions of highest KL, highest first, each with its context and predictions."""
    flat = scores.kl.flatten()
    values, order = flat.topk(min(top, flat.numel()))
    width = scores.kl.shape[1]
    text = lambda ids: tokenizer.decode([int(i) for i in ids])  # noqa: E731
    records = []
    for rank, (value, index) in enumerate(zip(values.tolist(), order.tolist())):
        row, pos = divmod(index, width)
        ids = scores.contexts[row]
        preds = lambda i, p: [{"token": text([t]), "id": int(t), "p": round(float(q), 5)}  # noqa: E731
                              for t, q in zip(i[row, pos], p[row, pos])]
        records.append(
            {
                "rank": rank + 1,
                "context": row,
                "position": pos,
                "kl": value,
                "fvu": float(scores.fvu[row, pos]),
                "token": text([ids[pos]]),
                "token_id": int(ids[pos]),
                "next_token": text([ids[pos + 1]]),
                "next_token_id": int(ids[pos + 1]),
                "before": text(ids[max(0, pos - window) : pos]),
                "after": text(ids[pos + 1 : pos + 1 + window]),
                "clean_top": preds(scores.clean_ids, scores.clean_p),
                "spliced_top": preds(scores.spliced_ids, scores.spliced_p),
            }
        )
    return records


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:80em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;vertical-align:top}th{background:#eee}
.ctx{font-family:monospace;white-space:pre-wrap}.tok{background:#f99;outline:1px solid #000}.next{background:#9cf}"""


def _predictions(preds: list[dict]) -> str:
    return "<br>".join(f"{html.escape(repr(p['token']))} {p['p']:.3f}" for p in preds)


def page(name: str, model: str, summary: dict, records: list[dict]) -> str:
    """The dashboard page of one dictionary's highest-KL tokens."""
    head = (f"<h2>Tokens no dictionary explains: {html.escape(name)}</h2><p>model: {html.escape(model)} (held-out "
            f"text); {summary['n_predictions']} predictions, mean KL {summary['kl_mean']:.4g} nats; the top "
            f"{100 * summary['share_frac']:g}% of tokens carry {100 * summary['top_share']:.1f}% of the total KL. "
            "Red: the token whose activation was reconstructed; blue: the token predicted.</p>")
    rows = "".join(
        f"<tr><td>{r['rank']}</td><td>{r['kl']:.4f}</td><td>{r['fvu']:.3f}</td><td class='ctx'>"
        f"{html.escape(r['before'])}<span class='tok'>{html.escape(r['token'])}</span>"
        f"<span class='next'>{html.escape(r['next_token'])}</span>{html.escape(r['after'])}</td>"
        f"<td>{_predictions(r['clean_top'])}</td><td>{_predictions(r['spliced_top'])}</td></tr>" for r in records)
    table = ("<table><thead><tr><th>rank</th><th>KL</th><th>FVU at token</th><th>context</th><th>clean top</th>"
             f"<th>spliced top</th></tr></thead><tbody>{rows}</tbody></table>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>residue {html.escape(name)}</title>"
            f"<style>{STYLE}</style></head><body>{head}{table}</body></html>")


def residue(cfg: DictConfig, entries: list[Entry]) -> dict:
    """Write every dictionary's highest-KL held-out tokens and the summary; return the summary."""
    settings: ResidueSettings = settings_of(cfg)
    out = Path(cfg.out) / "residue"
    device, summary = resolve_device(cfg.device), {}
    for group in groups(entries):
        session = session_for(group[0].meta, device, cfg.seed)
        model_name = str(group[0].meta["model"]["name_or_path"])
        for entry in group:
            contexts = session.eval_contexts(eval_tokens(entry.meta))
            dictionary = entry.dictionary.to(device)
            scores = token_scores(session.model, dictionary, entry.hook, contexts, session.special_ids,
                                  settings.batch_size, settings.predictions)
            records = top_records(scores, settings.top, settings.window, session.tokenizer)
            summary[entry.name] = {"model": model_name, "hook": entry.hook.name, "n_predictions": scores.kl.numel(),
                                   "kl_mean": scores.kl.double().mean().item(), "share_frac": settings.share_frac,
                                   "top_share": top_share(scores.kl, settings.share_frac), "top": len(records)}
            directory = out / entry.name
            write_text(directory / "tokens.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            write_text(directory / "index.html", page(entry.name, model_name, summary[entry.name], records))
            print(f"{entry.name}: mean KL {summary[entry.name]['kl_mean']:.4g}; the top {100 * settings.share_frac:g}% "
                  f"of tokens carry {100 * summary[entry.name]['top_share']:.1f}% of it -> {directory}")
    write_json(out / "summary.json", summary)
    return summary
