"""evaluate.py's by-layer figure: which rows make one line, and that it is a PNG."""

from sae.evaluation.plots import _line_groups, plot_by_layer


def _row(kind, layer, k, kl=0.1):
    return {"kind": kind, "layer": layer, "site": "resid", "k": k, "l0": k or 30.0, "fvu": 0.1,
            "kl_spliced": kl, "ce_loss_recovered": 0.99}


def test_a_topk_sweep_gets_one_line_per_kind_and_k():
    rows = [_row(kind, layer, k) for layer in (0, 1) for k in (8, 16) for kind in ("dictionary", "pca_topk")]
    groups = _line_groups(rows)
    assert sorted(groups) == [("dictionary", "k=16"), ("dictionary", "k=8"), ("pca_topk", "k=16"), ("pca_topk", "k=8")]
    assert all(len(g) == 2 for g in groups.values())


def test_l1_dictionaries_get_one_line_per_kind():
    rows = [_row("dictionary", 0, None), _row("pca_topk", 0, 29), _row("dictionary", 1, None), _row("pca_topk", 1, 36)]
    assert sorted(_line_groups(rows)) == [("dictionary", ""), ("pca_topk", "")]


def test_by_layer_is_a_png(tmp_path):
    rows = [
        _row(kind, layer, k, kl=0.01 * (layer + 1))
        for layer in (0, 1, 2)
        for k in (8, 16)
        for kind in ("dictionary", "ica_topk")
    ]
    plot_by_layer(rows, tmp_path / "by_layer.png", "test")
    assert (tmp_path / "by_layer.png").read_bytes()[:4] == b"\x89PNG"
