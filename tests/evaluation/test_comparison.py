"""The matched comparison: each dictionary beside the top-k baselines at its rounded L0, on hand-made rows."""

import pytest

from sae.evaluation.comparison import compare, markdown, matched_k


def _row(name, kind, layer, l0, fvu, kl, ce_spliced, k=None):
    return {"name": name, "kind": kind, "layer": layer, "site": "resid", "k": k, "l0": l0, "fvu": fvu,
            "kl_spliced": kl, "ce_spliced": ce_spliced, "ce_clean": 6.0, "ce_loss_recovered": 0.99}


ROWS = [
    _row("a", "dictionary", 0, 7.6, 0.10, 0.05, 6.02),
    _row("b", "dictionary", 1, 12.2, 0.20, 0.30, 6.20),
    _row("pca0", "pca", 0, 128, 0.0, 0.0, 6.0),  # dense: never matched
    _row("pca0_7", "pca_topk", 0, 7, 0.30, 0.01, 6.01, k=7),  # wrong k: not matched
    _row("pca0_8", "pca_topk", 0, 8, 0.25, 0.08, 6.04, k=8),
    _row("ica0_8", "ica_topk", 0, 8, 0.40, 0.20, 6.10, k=8),
    _row("pca1_12", "pca_topk", 1, 12, 0.22, 0.25, 6.15, k=12),
    _row("pca0_12", "pca_topk", 0, 12, 0.01, 0.001, 6.0, k=12),  # right k, wrong layer
]


def test_matched_k_rounds_and_is_at_least_one():
    assert [matched_k(v) for v in (0.2, 7.6, 12.2, "29.0")] == [1, 8, 12, 29]


def test_each_dictionary_meets_the_baselines_at_its_rounded_l0():
    first, second = compare(ROWS)
    assert (first["name"], first["k"], second["name"], second["k"]) == ("a", 8, "b", 12)
    assert first["kl_spliced_pca_topk"] == 0.08 and first["kl_spliced_ica_topk"] == 0.20
    assert first["fvu_pca_topk"] == 0.25 and first["ce_diff_ica_topk"] == pytest.approx(0.10)
    assert first["ce_diff_dictionary"] == pytest.approx(0.02) and first["kl_lowest"] is True
    assert "kl_spliced_ica_topk" not in second and second["kl_lowest"] is False  # 0.30 > PCA's 0.25


def test_rows_read_back_from_csv_strings():
    as_text = [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in ROWS]
    assert compare(as_text)[0]["kl_spliced_pca_topk"] == 0.08


def test_markdown_marks_a_loss():
    text = markdown(compare(ROWS))
    assert "kl_spliced: dict / ica-k / pca-k" in text
    assert "| 0 | a | 7.6 | 8 | 0.100 / 0.400 / 0.250 | 0.0500 / 0.2000 / 0.0800 |" in text
    last = text.splitlines()[-1]
    assert "| 0.3000 / – / 0.2500 |" in last and last.endswith("| **no** |")  # no ICA row at k 12 on layer 1
