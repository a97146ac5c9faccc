"""Dictionary variants: the shared encode/decode interface, normalisation inside, and saving to disk."""

import pytest
import torch

from sae import build, load, save_dictionary
from sae.dictionaries import VARIANTS
from sae.dictionaries.base import firing
from sae.errors import ConfigError
from sae.training.objectives import reconstruction_loss

HPARAMS = {
    "relu_tied": {"l1_coeff": 0.01},
    "relu": {"l1_coeff": 0.01},
    "topk": {"k": 4, "aux_coeff": 1 / 32, "k_aux": None},
    "batchtopk": {"k": 4, "aux_coeff": 1 / 32, "k_aux": None, "threshold_lr": 0.01},
    "matryoshka": {"k": 4, "aux_coeff": 1 / 32, "k_aux": None, "threshold_lr": 0.01, "prefixes": [0.25, 0.5]},
    "jumprelu": {"l0_coeff": 1e-3, "bandwidth": 1e-3, "init_threshold": 1e-3},
    "gated": {"l1_coeff": 0.01},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_interface_and_round_trip(variant, tmp_path):
    torch.manual_seed(0)
    d = build(variant, 16, 48, **HPARAMS[variant])
    x = 100 + 7 * torch.randn(3, 5, 16)  # model units: large mean and scale
    d.init_from_data(x.flatten(0, 1))
    codes = d.encode(x)
    assert codes.shape == (3, 5, 48) and (codes >= 0).all()
    assert d.decode(codes).shape == x.shape
    torch.testing.assert_close(d.decoder_weight().norm(dim=-1), torch.ones(48))
    assert d.decode(torch.zeros(48)).allclose(x.flatten(0, 1).mean(0), atol=1e-4)  # the bias is the data mean
    save_dictionary(d, tmp_path, {"note": "test"})
    loaded = load(tmp_path)
    torch.testing.assert_close(loaded(x), d(x))
    assert loaded.variant == variant and float(loaded.scale) == pytest.approx(float(d.scale))


def test_normalisation_gives_unit_total_variance():
    d = build("relu_tied", 8, 16, l1_coeff=0.0)
    x = 50 + 3 * torch.randn(4096, 8)
    d.init_from_data(x)
    xn = x / d.scale
    assert (xn - xn.mean(0)).pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-4)


def test_topk_keeps_k():
    """Exactly k positive codes per input (the k largest pre-activations), where at least k are positive."""
    torch.manual_seed(0)
    d = build("topk", 16, 64, k=5, aux_coeff=0.0, k_aux=None)
    with torch.no_grad():
        d.b_enc.fill_(10.0)  # every pre-activation positive: the count is exact
        x = torch.randn(100, 16)
        codes, pre = d.encode(x), d.pre_activations(x / d.scale)
    assert ((codes > 0).sum(-1) == 5).all() and (codes >= 0).all()
    assert torch.equal(codes.topk(5, dim=-1).indices.sort(-1).values, pre.topk(5, dim=-1).indices.sort(-1).values)


def test_tied_encoder_is_decoder_transpose():
    d = build("relu_tied", 8, 16, l1_coeff=0.0)
    x = torch.randn(10, 8)
    expected = torch.relu((x - d.b_dec) @ d.decoder_weight().T + d.b_enc)
    torch.testing.assert_close(d.encode(x), expected)


def test_loss_terms_by_hand():
    d = build("relu", 4, 8, l1_coeff=0.5)
    x = torch.randn(32, 4)
    loss, out = reconstruction_loss(d, x)
    codes = torch.relu((x - d.b_dec) @ d.W_enc.T + d.b_enc)
    x_hat = codes @ (d.W_dec / d.W_dec.norm(dim=1, keepdim=True)) + d.b_dec
    assert out["mse"].item() == pytest.approx(((x_hat - x) ** 2).sum(-1).mean().item(), rel=1e-5)
    assert out["sparsity"].item() == pytest.approx(0.5 * codes.abs().sum(-1).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(out["mse"].item() + out["sparsity"].item(), rel=1e-6)
    assert reconstruction_loss(d, x, sparsity_weight=0.5)[0].item() == pytest.approx(
        out["mse"].item() + 0.5 * out["sparsity"].item(), rel=1e-6
    )


def test_unknown_variant_and_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="unknown dictionary variant"):
        build("no_such_variant", 4, 8)
    with pytest.raises(ConfigError, match="no dictionary"):
        load(tmp_path)


def dense_topk_loss(d, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The TopK loss written with dense codes: the reference for the sparse training path."""
    pre = d.pre_activations(x)
    x_hat = d.decode_normalised(d.encode_normalised(x))
    residual = x - x_hat.detach()
    aux_codes = torch.zeros_like(pre).scatter_(
        -1, *reversed(torch.relu(pre.masked_fill(~dead, float("-inf"))).topk(d.k_aux, dim=-1))
    )
    aux = ((aux_codes @ d.decoder_weight() - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum())
    return (x_hat - x).pow(2).sum(-1).mean() + d.aux_coeff * aux


def test_sparse_topk_loss_and_gradients_equal_dense():
    torch.manual_seed(0)
    d = build("topk", 24, 96, k=6, aux_coeff=1 / 32, k_aux=5)
    d.init_from_data(3 + torch.randn(256, 24))
    x = torch.randn(64, 24) / d.scale + d.b_dec
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True

    def grads(loss_fn):
        d.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in d.named_parameters()}

    sparse_loss, sparse = grads(lambda: reconstruction_loss(d, x, dead)[0])
    dense_loss, dense = grads(lambda: dense_topk_loss(d, x, dead))
    torch.testing.assert_close(sparse_loss, dense_loss)
    assert sparse.keys() == {"b_dec", "W_dec", "W_enc", "b_enc"}
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], msg=name)
    codes = d.train_terms(x)["codes"]
    assert codes.layout == torch.sparse_csr  # no [batch, features] pass for the firing counts
    torch.testing.assert_close(codes.to_dense(), d.encode_normalised(x))
    torch.testing.assert_close(firing(codes), firing(d.encode_normalised(x)))


def test_sparse_decode_gradients_equal_dense():
    from sae.dictionaries.topk import densify, sparse_decode

    torch.manual_seed(0)
    weight = torch.randn(40, 8, requires_grad=True)
    values = torch.rand(16, 5, requires_grad=True)
    indices = torch.stack([torch.randperm(40)[:5] for _ in range(16)])
    grad_out = torch.randn(16, 8)
    sparse = torch.autograd.grad(sparse_decode(indices, values, weight), (values, weight), grad_out)
    dense = torch.autograd.grad(densify(indices, values, 40) @ weight, (values, weight), grad_out)
    for s, dn in zip(sparse, dense):
        torch.testing.assert_close(s, dn)
