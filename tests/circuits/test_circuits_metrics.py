"""Patching metrics from logits (hand-computed), the curves/summary tables and CSVs, and the patching figure."""

import math

import pytest
import torch

from sae.circuits.curves import (
    CURVE_FIELDS,
    SUMMARY_FIELDS,
    curve_rows,
    read_rows,
    summarise,
    write_curves,
    write_summary,
)
from sae.circuits.metrics import (
    PairTotals,
    edit_size,
    fraction_restored,
    kl_patched_to_counterfactual,
    logit_difference,
    mean_kl,
    patch_report,
)
from sae.circuits.plots import plot_patching_hooks
from sae.circuits.pruning import CurvePoint
from sae.errors import ConfigError


def test_kl_direction_by_hand():
    p, q = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    patched, cf = p.log()[None], q.log()[None]  # logits whose softmax is p and q
    by_hand = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(p || q)
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(kl_patched_to_counterfactual(patched, cf)) == pytest.approx(by_hand, rel=1e-5)
    assert by_hand != pytest.approx(reverse)
    assert float(kl_patched_to_counterfactual(cf, cf)) == pytest.approx(0.0, abs=1e-7)
    # [b, T, V]: only the final position counts; the mean is over pairs
    seq = torch.stack([torch.stack([cf[0], patched[0]]), torch.stack([patched[0], cf[0]])])  # [2, 2, 2]
    cf_seq = cf.expand(2, 2, 2)
    assert float(mean_kl(seq, cf_seq)) == pytest.approx(by_hand / 2, rel=1e-5)


def test_logit_difference_and_fraction_restored():
    logits = torch.tensor([[1.0, 4.0, 0.0], [2.0, 0.0, 5.0]])
    base_answer, cf_answer = torch.tensor([0, 0]), torch.tensor([1, 2])
    assert logit_difference(logits, base_answer, cf_answer).tolist() == [3.0, 3.0]
    assert fraction_restored(torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([2.0])) == 0.0
    assert fraction_restored(2.0, -2.0, 2.0) == 1.0
    assert fraction_restored(torch.tensor([0.0, 1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([2.0, 2.0])) == 0.625
    assert math.isnan(fraction_restored(1.0, 2.0, 2.0))


def test_edit_size():
    base = torch.zeros(2, 3, 4)
    patched = base.clone()
    patched[0, 1, 0] = 3.0
    patched[1, 2] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # norm 2
    assert edit_size(patched, base) == pytest.approx(5 / 6)
    assert edit_size(patched, base, torch.tensor([[False, True, False], [False, False, True]])) == pytest.approx(2.5)


def test_totals_over_batches_equal_one_report():
    torch.manual_seed(0)
    logits = {k: torch.randn(6, 3, 11) for k in ("patched", "base", "cf")}
    answers = torch.randint(0, 11, (6,)), (torch.randint(1, 11, (6,)))
    x, x_patched = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
    changed = torch.rand(6, 3) > 0.5
    totals = PairTotals()
    for rows in (slice(0, 2), slice(2, 6)):
        totals.add(
            logits["patched"][rows],
            logits["base"][rows],
            logits["cf"][rows],
            answers[0][rows],
            answers[1][rows],
            (x_patched - x)[rows],
            changed[rows],
        )
    whole = patch_report(logits["patched"], logits["base"], logits["cf"], *answers)
    result = totals.result()
    for key in ("kl", "logit_diff", "logit_diff_restored"):
        assert result[key] == pytest.approx(whole[key], rel=1e-5)
    assert result["edit_per_changed_position"] == pytest.approx(edit_size(x_patched, x, changed), rel=1e-5)
    assert result["changed_positions"] == pytest.approx(float(changed.sum()) / 6)
    assert whole["unpatched_kl"] == pytest.approx(float(mean_kl(logits["base"], logits["cf"])))
    with pytest.raises(ValueError):
        PairTotals().result()


def _curve(method, sizes_kl, ordering="greedy", hook="layers.1.resid", order="all"):
    points = [CurvePoint(n, kl, None if i == 0 else 10.0 ** (i - 6), tuple(range(n)), i + 1,
                         {"edit_per_changed_position": 0.1 * n, "logit_diff_restored": 1 - kl})
              for i, (n, kl) in enumerate(sizes_kl)]
    return curve_rows(
        points, method=method, hook=hook, order=order, ordering=ordering, unpatched_kl=2.0, model="stand-in"
    )


def test_summary_and_csv_round_trip(tmp_path):
    rows = (_curve("dictionary", [(100, 0.1), (40, 0.2), (8, 0.9), (3, 1.5), (0, 2.0)])
            + _curve("pca", [(128, 0.5), (64, 0.8), (20, 1.2), (0, 2.0)])
            + _curve("pca", [(0, 2.0), (10, 1.1), (50, 0.95)], ordering="attribution"))
    summary = {(r["method"], r["ordering"]): r for r in summarise(rows, target_fraction=0.5)}
    assert (
        summary[("dictionary", "greedy")]["fewest_features"] == 8
        and summary[("dictionary", "greedy")]["target_kl"] == 1.0
    )
    assert (
        summary[("dictionary", "greedy")]["min_kl"] == 0.1
        and summary[("dictionary", "greedy")]["n_features_at_min_kl"] == 100
    )
    assert summary[("pca", "greedy")]["fewest_features"] == 64 and summary[("pca", "greedy")][
        "edit_per_changed_position_at_fewest"
    ] == pytest.approx(6.4)
    assert summary[("pca", "attribution")]["fewest_features"] == 50
    assert summarise(rows, 0.2)[1]["fewest_features"] is None  # pca never reaches 0.4
    write_curves(tmp_path / "patching" / "curves.csv", rows)
    write_summary(tmp_path / "patching" / "summary.csv", summarise(rows))
    back = read_rows(tmp_path / "patching" / "curves.csv")
    assert list(back[0]) == list(CURVE_FIELDS) and len(back) == len(rows)
    assert back[0]["threshold"] is None and float(back[1]["threshold"]) == pytest.approx(1e-5)
    assert float(back[2]["kl"]) == 0.9 and back[0]["model"] == "stand-in"
    assert list(read_rows(tmp_path / "patching" / "summary.csv")[0]) == list(SUMMARY_FIELDS)
    assert sorted(p.name for p in (tmp_path / "patching").iterdir()) == ["curves.csv", "summary.csv"]  # no temporaries
    with pytest.raises(ConfigError, match=r"target_fraction=0.0 must be in \(0, 1\]"):
        summarise(rows, 0.0)


def test_patching_plot(tmp_path):
    rows = (_curve("dictionary", [(100, 0.1), (8, 0.9), (0, 2.0)]) + _curve("pca", [(128, 0.5), (0, 2.0)])
            + _curve("pca", [(128, 0.5), (0, 2.0)], hook="layers.2.resid")
            + _curve("pca", [(0, 2.0), (10, 1.1)], ordering="attribution", hook="layers.2.resid", order="ABBA"))
    paths = plot_patching_hooks(rows, tmp_path / "plots", "stand-in model neox-ioi-14m; task ioi")
    assert [p.name for p in paths] == ["patching_layers.1.resid.png", "patching_layers.2.resid.png"]
    from matplotlib.image import imread

    image = imread(paths[0])
    assert image.shape[0] > 200 and image.shape[1] > 600 and image[..., :3].std() > 0.01
    write_curves(tmp_path / "c.csv", rows)
    assert len(plot_patching_hooks(read_rows(tmp_path / "c.csv"), tmp_path / "again", "t")) == 2
