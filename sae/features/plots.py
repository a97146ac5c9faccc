"""Figures of one feature, for papers."""

from __future__ import annotations

from pathlib import Path

from sae.evaluation.plots import plt, save_figure


def plot_feature(rec: dict, names: dict[int, str], path: Path, title: str) -> None:
    """One feature for papers: its activations stacked by token, and the causal logit change over the vocabulary."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    edges = rec["histogram"]["edges"]
    below = [0] * (len(edges) - 1)
    for stack in rec["histogram"]["stacks"]:
        above = [b + c for b, c in zip(below, stack["counts"])]
        label = "other" if stack["token"] is None else repr(names.get(stack["token"], str(stack["token"])))
        left.stairs(above, edges, baseline=below, fill=True, label=label)
        below = above
    left.set(xlabel="activation", ylabel="tokens")
    left.legend(fontsize=6)
    causal = rec["causal"]["hist"]
    right.stairs(causal["counts"], causal["edges"], fill=True)
    right.set(xlabel="next-token logit change when ablated", ylabel="vocabulary tokens", yscale="log")
    save_figure(fig, path, title)
