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


def test_each_panel_marks_its_own_chance_level(tmp_path, monkeypatch):
    """Intruder's chance is 1/k (0.25 with 4 passages), not the 0.5 of a balanced accuracy."""
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    summary = [
        {"score": score, "hook": "layers.3.resid", "layer": 3, "method": "dictionary", "mean": 0.6,
         "ci_low": 0.5, "ci_high": 0.7, "chance": chance}
        for score, chance in (("detection", 0.5), ("intruder", 0.25))
    ]
    plots.plot_by_layer(summary, tmp_path / "by_layer.png", "chance")
    detection, intruder = figures[0].axes[0], figures[0].axes[3]  # rows: detection, intruder; first column
    assert [line.get_ydata()[0] for line in detection.lines if line.get_linestyle() == ":"] == [0.5]
    assert [line.get_ydata()[0] for line in intruder.lines if line.get_linestyle() == ":"] == [0.25]
