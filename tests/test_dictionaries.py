"""Dictionary variants: the shared encode/decode interface, normalisation inside, and saving to disk."""

import pytest
import torch

from sae import build, load, save_dictionary
from sae.dictionaries import VARIANTS
from sae.errors import ConfigError

HPARAMS = {"relu_tied": {"l1_coeff": 0.01}, "relu": {"l1_coeff": 0.01}, "topk": {"k": 4}}


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
    d = build("topk", 16, 64, k=5)
    assert ((d.encode(torch.randn(100, 16)) != 0).sum(-1) <= 5).all()


def test_tied_encoder_is_decoder_transpose():
    d = build("relu_tied", 8, 16, l1_coeff=0.0)
    x = torch.randn(10, 8)
    expected = torch.relu((x - d.b_dec) @ d.decoder_weight().T + d.b_enc)
    torch.testing.assert_close(d.encode(x), expected)


def test_loss_terms_by_hand():
    d = build("relu", 4, 8, l1_coeff=0.5)
    x = torch.randn(32, 4)
    out = d.loss(x)
    codes = torch.relu((x - d.b_dec) @ d.W_enc.T + d.b_enc)
    x_hat = codes @ (d.W_dec / d.W_dec.norm(dim=1, keepdim=True)) + d.b_dec
    assert out["mse"].item() == pytest.approx(((x_hat - x) ** 2).sum(-1).mean().item(), rel=1e-5)
    assert out["sparsity"].item() == pytest.approx(0.5 * codes.abs().sum(-1).mean().item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["mse"].item() + out["sparsity"].item(), rel=1e-6)


def test_unknown_variant_and_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="unknown dictionary variant"):
        build("gated", 4, 8)
    with pytest.raises(ConfigError, match="no dictionary"):
        load(tmp_path)
