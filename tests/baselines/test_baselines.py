"""Baselines: exact round trips, FastICA recovering planted sources, top-k sparsity, saving and loading."""

import pytest
import torch

import sae
from sae.baselines import BASELINES, fit
from sae.errors import ConfigError
from sae.evaluation.metrics import fvu


def _data(n: int = 4000, d: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=gen)
    return 50.0 + torch.randn(n, d, generator=gen) @ mixing  # a large mean: centring must be right


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_full_basis_reconstructs_exactly(kind):
    x = _data()
    basis = fit(kind, x)
    torch.testing.assert_close(basis.decode(basis.encode(x)), x, rtol=1e-4, atol=1e-3)
    assert basis.decoder_weight().norm(dim=-1).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_fit_builds_no_autograd_graph(kind, monkeypatch):
    """The fit sees activations without a graph (``b_dec`` is a parameter): with one, FastICA kept every
    iteration's tensors alive until the fit ended."""
    cls, seen = BASELINES[kind], []
    atoms = cls.atoms

    def spy(z, seed):
        seen.append(z.requires_grad or torch.is_grad_enabled())
        return atoms(z, seed)

    monkeypatch.setattr(cls, "atoms", staticmethod(spy))
    basis = fit(kind, _data(n=500))
    assert seen == [False] and not basis.decoder_weight().requires_grad


def test_pca_orders_components_by_variance():
    x = _data()
    codes = fit("pca", x).encode(x)
    variances = codes.var(0)
    assert torch.all(variances[:-1] >= variances[1:])
    assert codes.mean(0).abs().max() < 1e-2  # centred


def test_random_directions_are_an_orthonormal_basis_whose_top_k_beats_the_mean():
    x = _data(d=32)
    basis = fit("random", x)
    atoms = basis.decoder_weight().double()
    torch.testing.assert_close(atoms @ atoms.T, torch.eye(32, dtype=torch.float64), atol=1e-6, rtol=0)
    assert not torch.allclose(atoms.abs(), torch.eye(32, dtype=torch.float64), atol=0.5)  # not the neuron basis
    for k in (1, 4, 16):
        assert fvu(x, basis.with_top_k(k).decode(basis.with_top_k(k).encode(x))) < 1


def test_neurons_are_the_coordinates():
    x = _data()
    basis = fit("neurons", x)
    torch.testing.assert_close(basis.encode(x) * basis.scale, x)


def test_ica_recovers_planted_sources():
    gen = torch.Generator().manual_seed(1)
    n, d = 20000, 4
    sources = torch.stack([
        torch.rand(n, generator=gen) * 2 - 1,  # uniform (sub-Gaussian)
        torch.distributions.Laplace(0.0, 1.0).sample((n,)),  # super-Gaussian
        torch.sign(torch.randn(n, generator=gen)),  # binary
        torch.randn(n, generator=gen).pow(3),  # heavy-tailed
    ], 1)
    mixing = torch.randn(d, d, generator=gen)
    basis = fit("ica", sources @ mixing.T + 3.0)
    true_atoms = mixing.T / mixing.T.norm(dim=1, keepdim=True)  # source i adds along column i of the mixing
    cos = (basis.decoder_weight() @ true_atoms.T).abs()
    assert cos.max(0).values.min() > 0.95, cos


def test_ica_warns_when_it_stops_before_converging():
    from sae.baselines.ica import fast_ica

    white = torch.distributions.Laplace(0.0, 1.0).sample((2000, 4))
    with pytest.warns(UserWarning, match="did not converge in 1 iterations"):
        fast_ica(white, seed=0, max_iter=1)


def test_top_k_keeps_the_k_largest_codes():
    x = _data()
    basis = fit("pca", x)
    dense, sparse = basis.encode(x), basis.with_top_k(3).encode(x)
    kept = sparse != 0
    assert (kept.sum(-1) == 3).all() and basis.k is None
    torch.testing.assert_close(sparse[kept], dense[kept])
    smallest_kept = dense.abs().masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = dense.abs().masked_fill(kept, 0.0).max(-1).values
    assert (smallest_kept >= largest_dropped).all()


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_saved_baseline_loads_with_sae_load(kind, tmp_path):
    x = _data()
    basis = fit(kind, x).with_top_k(5)
    sae.save_dictionary(basis, tmp_path, {"baseline": kind})
    loaded = sae.load(tmp_path)
    assert type(loaded) is type(basis) and loaded.k == 5
    torch.testing.assert_close(loaded.encode(x), basis.encode(x))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_unknown_baseline():
    with pytest.raises(ConfigError, match="unknown baseline 'nmf'"):
        fit("nmf", _data())
