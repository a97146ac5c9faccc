"""The study's figure labels its x axis with whole layers, also for a one-layer study (where the offsets that keep
the methods' intervals apart once gave ticks 2.925, 2.94, ..., 3.075)."""

from __future__ import annotations

from sae.autointerp import plots


def test_a_one_layer_study_shows_one_integer_tick(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to read its axis
    summary = [
        {"score": "detection", "hook": "layers.3.resid", "layer": 3, "method": method, "mean": 0.6,
         "ci_low": 0.5, "ci_high": 0.7}
        for method in ("dictionary", "pca", "ica", "neurons")
    ]
    plots.plot_by_layer(summary, tmp_path / "by_layer.png", "one layer")
    ax = figures[0].axes[0]
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    assert [t for t in ax.get_xticks() if low <= t <= high] == [3.0]
