"""evaluate.py's figures: the FVU-vs-L0 frontier per layer, spliced-LM quality per layer, feature densities, single
features."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from sae.lm.model import model_label  # noqa: E402

COLORS = {"dictionary": "black", "pca": "tab:blue", "ica": "tab:orange", "random": "tab:green", "neurons": "tab:red"}
FVU_TOP = 1.2  # the frontier's y axis stops here (a top-k baseline can reconstruct worse than the mean alone)


def style(kind: str) -> dict:
    """Dictionaries as stars; each baseline in its own colour, dense as hollow circles, top-k as filled squares."""
    if kind == "dictionary":
        return dict(marker="*", markersize=12, color="black")
    base = kind.removesuffix("_topk")
    filled = kind.endswith("_topk")
    return dict(
        marker="s" if filled else "o", markersize=5, color=COLORS.get(base), markerfacecolor=None if filled else "none"
    )


def _model_label(results: list) -> str:
    names = sorted({model_label(e.meta["model"]["name_or_path"]) for e, _ in results})
    return f"model: {', '.join(names)}; held-out text"


def _by_kind(rows: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        kinds[row["kind"]].append(row)
    return kinds


def save_figure(fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # legends may sit outside the axes
    plt.close(fig)


def plot_frontier(rows: list[dict], path: Path, title: str) -> None:
    """FVU against L0 (log scale), one panel per hook: dictionaries against each baseline, dense and top-k."""
    hooks = sorted({(r["layer"], r["site"]) for r in rows})
    n_cols = min(3, len(hooks))
    n_rows = -(-len(hooks) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols, 3.2 * n_rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(hooks):]:
        ax.set_axis_off()
    for ax, (layer, site) in zip(axes.flat, hooks):
        at_hook = [r for r in rows if (r["layer"], r["site"]) == (layer, site)]
        for kind, kind_rows in sorted(_by_kind(at_hook).items()):
            kind_rows = sorted(kind_rows, key=lambda r: r["l0"])
            ax.plot([r["l0"] for r in kind_rows], [r["fvu"] for r in kind_rows], label=kind,
                    linestyle="-" if len(kind_rows) > 1 else "none", **style(kind))
        ax.set(xscale="log", title=f"layer {layer} {site}", xlabel="L0", ylim=(0, FVU_TOP))
        ax.set_xticks(sorted({round(r["l0"]) for r in at_hook}))  # the L0s drawn, not crowded decades
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    for row in axes:
        row[0].set_ylabel(f"FVU (axis cut at {FVU_TOP})")
    legend = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.92))
    save_figure(fig, path, f"FVU vs L0 ({title})")


def _line_groups(sparse: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows per line of ``plot_by_layer``: per kind and k when every layer has the same set of k (a TopK sweep,
    its top-k baselines at the same k), else per kind."""
    ks = {layer: {r.get("k") for r in sparse if r["layer"] == layer} for layer in {r["layer"] for r in sparse}}
    by_k = None not in set().union(*ks.values()) and len({frozenset(v) for v in ks.values()}) == 1
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in sparse:
        groups[(row["kind"], f"k={row['k']}" if by_k else "")].append(row)
    return groups


LINESTYLES = ["-", "--", ":", "-."]


def plot_by_layer(rows: list[dict], path: Path, title: str) -> None:
    """CE loss recovered (zero ablation) and spliced KL per layer: one line per kind (per kind and k in a sweep with
    the same k at every layer), the mean over its rows at each layer.

    Dense baselines reconstruct exactly (KL 0 up to rounding), so only dictionaries and top-k baselines are drawn.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sparse = [r for r in rows if r["kind"] == "dictionary" or r["kind"].endswith("_topk")]
    groups = _line_groups(sparse) if sparse else {}
    labels = sorted({label for _, label in groups}, key=lambda s: (len(s), s))
    for (kind, label), group in sorted(groups.items()):
        layers = sorted({r["layer"] for r in group})
        for ax, metric in zip(axes, ("ce_loss_recovered", "kl_spliced")):
            means = [
                sum(r[metric] for r in group if r["layer"] == layer) / sum(r["layer"] == layer for r in group)
                for layer in layers
            ]
            ax.plot(
                layers,
                means,
                label=f"{kind} {label}".strip(),
                linestyle=LINESTYLES[labels.index(label) % 4],
                **style(kind),
            )
    axes[0].set(xlabel="layer", ylabel="CE loss recovered (zero ablation)")
    axes[1].set(xlabel="layer", ylabel="KL(clean || spliced), nats/token", yscale="log")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    save_figure(fig, path, f"Spliced-LM quality by layer ({title})")


def plot_density(hist: dict, path: Path, title: str) -> None:
    """The log10 feature-density histogram of one dictionary (dead features counted apart)."""
    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.stairs(counts, edges, fill=True)
    ax.set(xlabel="log10 feature density (fraction of tokens it fires on)", ylabel="features")
    save_figure(fig, path, title)


def plot_all(directory: Path, rows: list[dict], results: list) -> None:
    """``frontier.png``, ``by_layer.png`` and ``density/<name>.png`` for each dictionary, under ``directory``."""
    label = _model_label(results)
    plot_frontier(rows, directory / "frontier.png", label)
    plot_by_layer(rows, directory / "by_layer.png", label)
    for entry, metrics in results:
        if entry.kind == "dictionary":
            name = entry.name.replace("/", "_")
            dead = f"{metrics['dead_frac']:.1%} dead"
            plot_density(
                metrics["log10_density_hist"], directory / "density" / f"{name}.png", f"{entry.name}: {dead} ({label})"
            )
