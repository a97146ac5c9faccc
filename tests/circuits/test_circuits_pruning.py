"""Choosing features to patch: greedy pruning recovers planted features of a hand-made metric; the attribution order."""

import math

import pytest
import torch

from sae.circuits.pruning import attribution_curve, attribution_scores, greedy_prune, log_thresholds, ranked, size_grid
from sae.errors import ConfigError

N = 40
PLANTED = {3: 0.5, 11: 0.02, 27: 0.003}  # feature -> how much un-patching it raises the metric


def additive_metric(weights: torch.Tensor):
    """KL-like: 0 with everything patched; each un-patched feature adds its weight (negative: it helps to drop it)."""
    calls = []

    def metric(patched: torch.Tensor) -> float:
        calls.append(patched.clone())
        return float(weights[~patched].sum())

    return metric, calls


def planted_weights(noise: float = 1e-7) -> torch.Tensor:
    weights = torch.full((N,), noise)
    weights[5] = -0.01  # un-patching it lowers the metric: dropped at the first threshold too
    for j, w in PLANTED.items():
        weights[j] = w
    return weights


def test_log_thresholds():
    taus = log_thresholds()
    assert len(taus) == 50 and taus[0] == pytest.approx(1e-5) and taus[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(taus, taus[1:])]
    assert max(ratios) == pytest.approx(min(ratios)) and min(ratios) > 1
    assert log_thresholds(3, 0.01, 1.0) == pytest.approx([0.01, 0.1, 1.0])


def test_greedy_recovers_planted_features():
    metric, _ = additive_metric(planted_weights())
    curve = greedy_prune(metric, N, seed=0)
    assert curve[0].threshold is None and curve[0].n_features == N and curve[0].metric == pytest.approx(0.0)
    for point in curve[1:]:
        # additive: a feature is un-patched exactly when its own weight is below the threshold
        assert set(point.features) == {j for j, w in PLANTED.items() if w >= point.threshold}, point.threshold
        assert point.metric == pytest.approx(
            sum(w for w in planted_weights()[[j for j in range(N) if j not in point.features]].tolist())
        )
    assert set(curve[1].features) == set(PLANTED)
    sizes = [p.n_features for p in curve]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 0


def test_greedy_costs_and_stats():
    metric, calls = additive_metric(planted_weights())
    seen = []
    curve = greedy_prune(metric, N, thresholds=[1e-5, 1e-2], seed=0,
                         stats=lambda patched: seen.append(patched) or {"edit_size": float(patched.sum())})
    assert [p.evaluations for p in curve] == [1, 1 + N, 1 + N + len(PLANTED)]
    assert len(calls) == curve[-1].evaluations and len(seen) == len(curve)
    assert [p.stats["edit_size"] for p in curve] == [N, len(PLANTED), 2]


def test_greedy_is_seeded_and_candidates_limit_it():
    # two redundant features: either one alone keeps the metric at 0; which survives depends on the visiting order
    def redundant(patched: torch.Tensor) -> float:
        return 0.0 if patched[0] or patched[1] else 1.0

    kept = {seed: greedy_prune(redundant, 6, thresholds=[1e-3], seed=seed)[-1].features for seed in range(12)}
    assert all(len(f) == 1 and f[0] in (0, 1) for f in kept.values())
    assert set(kept.values()) == {(0,), (1,)}  # both outcomes occur over seeds
    assert greedy_prune(redundant, 6, thresholds=[1e-3], seed=3)[-1].features == kept[3]
    candidates = torch.tensor([False, True, True, False, False, False])
    curve = greedy_prune(redundant, 6, thresholds=[1e-3], candidates=candidates)
    assert curve[0].features == (1, 2) and curve[-1].features == (1,)


@pytest.mark.parametrize("bad", [[], [0.1, 0.01], [0.0, 1.0], [1e-3, math.inf]])
def test_bad_thresholds(bad):
    with pytest.raises(ConfigError, match="thresholds"):
        greedy_prune(lambda m: 0.0, 3, thresholds=bad)


def test_attribution_scores_by_hand():
    delta = torch.tensor([[[1.0, 2.0, 0.0], [1.0, -2.0, 3.0]]])  # [pairs=1, positions=2, features=3]
    grad = torch.tensor([[[0.5, 1.0, 9.0], [-0.5, 1.0, -1.0]]])
    # feature 0: 0.5 - 0.5 = 0 (cancels across positions); 1: 2 - 2 = 0; 2: 0 - 3 -> 3
    assert attribution_scores(delta, grad).tolist() == [0.0, 0.0, 3.0]
    with pytest.raises(ValueError):
        attribution_scores(delta, grad[..., :2])


def test_attribution_is_exact_for_a_linear_metric():
    """For a metric linear in the codes, |(c̄ − c)·∂m/∂c| is exactly the change from patching each feature alone."""
    torch.manual_seed(0)
    codes, cf_codes, weight = torch.randn(4, 5, 8), torch.randn(4, 5, 8), torch.randn(5, 8)

    def value(patched: torch.Tensor) -> torch.Tensor:
        mixed = torch.where(patched, cf_codes, codes)
        return (mixed * weight).sum()

    c = codes.clone().requires_grad_(True)
    (c * weight).sum().backward()
    scores = attribution_scores(cf_codes - codes, c.grad)
    none = value(torch.zeros(8, dtype=torch.bool))
    exact = torch.stack(
        [(value(torch.nn.functional.one_hot(torch.tensor(j), 8).bool()) - none).abs() for j in range(8)]
    )
    assert torch.allclose(scores, exact.float(), atol=1e-5)


def test_attribution_curve_and_grid():
    weights = planted_weights(noise=0.0)
    metric, _ = additive_metric(weights)
    scores = weights.abs()
    curve = attribution_curve(metric, scores, sizes=[0, 1, 2, 3, 4, N])
    assert [p.n_features for p in curve] == [0, 1, 2, 3, 4, N]
    assert curve[1].features == (3,) and set(curve[3].features) == {3, 11, 5}  # |score| order: 0.5, 0.02, 0.01
    assert curve[0].metric == pytest.approx(float(weights.sum())) and curve[-1].metric == pytest.approx(0.0)
    assert set(curve[4].features) == set(PLANTED) | {5}
    grid = size_grid(1000)
    assert grid[0] == 0 and grid[-1] == 1000 and grid == sorted(set(grid)) and 1 in grid
    assert size_grid(0) == [0] and size_grid(3) == [0, 1, 2, 3]
    assert ranked(torch.tensor([1.0, 3.0, 3.0, 0.5]), torch.tensor([True, False, True, True])) == [2, 0, 3]
    default = attribution_curve(metric, scores)
    assert [p.n_features for p in default] == size_grid(N)
    with pytest.raises(ConfigError, match="sizes"):
        attribution_curve(metric, scores, sizes=[N + 1])


@pytest.mark.parametrize("lookahead", [2, 5, 64])
def test_lookahead_gives_the_same_curve(lookahead):
    """Batched speculative visits reproduce the one-at-a-time walk on a non-additive metric."""
    torch.manual_seed(0)
    w = torch.rand(N) ** 4
    pairs = torch.rand(N, N) * 0.05

    def metric(patched: torch.Tensor) -> float:
        off = (~patched).float()
        return float(w @ off + off @ pairs @ off)

    calls = []

    def many(masks):
        calls.append(len(masks))
        return [metric(m) for m in masks]

    taus = log_thresholds(12, 1e-4, 1.0)
    one = greedy_prune(metric, N, taus, seed=2)
    batched = greedy_prune(metric, N, taus, seed=2, metric_many=many, lookahead=lookahead)
    assert [p.features for p in batched] == [p.features for p in one]
    assert [p.metric for p in batched] == pytest.approx([p.metric for p in one])
    assert batched[-1].evaluations >= one[-1].evaluations and max(calls) <= lookahead
    assert len(calls) < one[-1].evaluations - 1  # fewer batched calls than single visits
    with pytest.raises(ConfigError, match="lookahead"):
        greedy_prune(metric, N, taus, metric_many=many, lookahead=0)
