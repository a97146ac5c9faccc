"""The perplexity gap (the seed's table) and the end-to-end paper's figure: CE increase against L0, by objective.

Every dictionary's ``sae.json`` says in its ``train.objective`` what it was trained to minimise (runs from before
the objective group, SAELens dictionaries and baselines: ``mse``/none), so MSE- and KL-trained dictionaries
evaluated together are told apart.
"""

from __future__ import annotations

from pathlib import Path

from sae.evaluation.plots import plt, save_figure

MARKERS = {"mse": ("o", "black"), "kl": ("*", "tab:red"), "kl_mse": ("s", "tab:blue"), "e2e_ds": ("^", "tab:green")}


def objective_of(meta: dict) -> str | None:
    """The objective a dictionary was trained with (``mse`` for runs that predate the choice), after the one of
    the dictionary it started from (``train.init_from``: ``mse→kl``); None for a baseline or a dictionary trained
    elsewhere (no ``train`` record)."""
    if "baseline" in meta or "train" not in meta:
        return None
    name = ((meta.get("train") or {}).get("objective") or {}).get("name", "mse")
    start = meta.get("initialised_from")
    return f"{start['objective']}→{name}" if start else name


def ppl_table(rows: list[dict]) -> str:
    """Per dictionary: objective, L0, ppl_clean, ppl_spliced and their difference, as a Markdown table."""
    lines = [
        "| dictionary | objective | L0 | fvu | kl_spliced | ppl_clean | ppl_spliced | ppl gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "dictionary":
            continue
        lines.append(
            f"| {r['name']} | {r.get('objective') or '-'} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['kl_spliced']:.4f} "
            f"| {r['ppl_clean']:.2f} | {r['ppl_spliced']:.2f} | {r['ppl_spliced'] - r['ppl_clean']:+.2f} |"
        )
    return "\n".join(lines)


def plot_ce_vs_l0(rows: list[dict], path: Path, title: str) -> None:
    """CE increase (ce_spliced - ce_clean, nats per token) against L0, one panel per hook, one series per
    objective (dictionaries only)."""
    rows = [r for r in rows if r["kind"] == "dictionary"]
    hooks = sorted({(r["layer"], r["site"]) for r in rows})
    if not hooks:
        return
    fig, axes = plt.subplots(1, len(hooks), figsize=(3.8 * len(hooks), 3.2), squeeze=False)
    for ax, (layer, site) in zip(axes.flat, hooks):
        at_hook = [r for r in rows if (r["layer"], r["site"]) == (layer, site)]
        for objective in sorted({r.get("objective") or "?" for r in at_hook}):
            series = sorted((r for r in at_hook if (r.get("objective") or "?") == objective), key=lambda r: r["l0"])
            # a fine-tuned dictionary (mse→kl) takes its last objective's marker, hollow, on a dashed line
            marker, color = MARKERS.get(objective.split("→")[-1], ("x", "gray"))
            tuned = "→" in objective
            ax.plot([r["l0"] for r in series], [r["ce_spliced"] - r["ce_clean"] for r in series], marker=marker,
                    color=color, label=f"objective={objective}", markerfacecolor="none" if tuned else color,
                    linestyle=("--" if tuned else "-") if len(series) > 1 else "none")
        ax.set(title=f"layer {layer} {site}", xlabel="L0", ylabel="CE increase (nats/token)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    save_figure(fig, path, f"CE increase vs L0 by training objective ({title})")
