"""Metrics against hand computations, and splicing a perfect reconstruction changes nothing."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from sae.dictionaries import Dictionary
from sae.hooks import HookPoint
from sae.metrics import fvu, heldout_metrics, l0, next_token_ce


def test_fvu_is_centred():
    rng = np.random.default_rng(0)
    x = 1000.0 + rng.normal(size=(500, 8))
    x_hat = x + 0.1 * rng.normal(size=x.shape)
    by_hand = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    got = fvu(torch.tensor(x), torch.tensor(x_hat)).item()
    assert got == pytest.approx(by_hand, rel=1e-9)
    assert got > 0.005  # the uncentred ratio would be ~1e-8 with a mean of 1000
    assert fvu(torch.tensor(x), torch.tensor(x).mean(0).expand(500, 8)).item() == pytest.approx(1.0)


def test_l0():
    codes = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.5]])
    assert l0(codes).item() == 1.5


def test_next_token_ce_by_hand():
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[0, 3, 1, 4]])
    logp = torch.log_softmax(logits, -1)
    by_hand = -(logp[0, 0, 3] + logp[0, 1, 1] + logp[0, 2, 4])
    assert next_token_ce(logits, ids).item() == pytest.approx(by_hand.item(), rel=1e-6)


class Identity(Dictionary):
    """codes = x, atoms = the standard basis: a perfect reconstruction."""

    variant = "identity-test"

    def encode_normalised(self, x):
        return x

    def decoder_weight(self):
        return torch.eye(self.d_in)


class Zero(Identity):
    def encode_normalised(self, x):
        return torch.zeros_like(x)


def _contexts():
    ids = torch.randint(2, 20, (6, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


def test_perfect_reconstruction_splices_to_clean_loss():
    model, hook = tiny_model(), HookPoint(1, "resid")
    m = heldout_metrics(model, Identity(32, 32), hook, _contexts(), [0], batch_size=4, progress=False)
    assert m["ce_spliced"] == m["ce_clean"]
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12) and m["mse"] == 0.0
    assert m["ce_zero_ablation"] != m["ce_clean"]
    assert m["ce_loss_recovered"] == pytest.approx(1.0)
    assert m["n_tokens"] == 6 * 15 and m["dead_frac"] == 0.0


def test_zero_reconstruction_is_zero_ablation():
    model, hook = tiny_model(), HookPoint(0, "mlp")
    m = heldout_metrics(model, Zero(64, 64), hook, _contexts(), [0], batch_size=4, progress=False)
    assert m["ce_spliced"] == pytest.approx(m["ce_zero_ablation"])
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert m["l0"] == 0.0 and m["dead_frac"] == 1.0
