"""Dead atoms come back: resampling for ReLU dictionaries, AuxK gradient for TopK."""

import pytest
import torch

from sae.module import TrainedDictionary
from sae.toy import ToyData


def killed_module(variant: str, hparams: dict, bias: float = -100.0) -> tuple[TrainedDictionary, torch.Tensor, torch.optim.Optimizer]:
    """A dictionary on toy data with its first 16 atoms killed (encoder bias ``bias``) and marked dead."""
    cfg = {"variant": variant, "d_in": 16, "n_features": 64, **hparams}
    module = TrainedDictionary(None, "toy", cfg, seed=0, dead_window=1000)
    d = module.dictionary
    x = ToyData(n_features=32, d=16, avg_active=3).sample(2048)
    d.init_from_data(x)
    x = x / d.scale
    with torch.no_grad():
        d.b_enc[:16] = bias
    module.tokens_since_fired[:16] = 10_000
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    d.loss(x)["loss"].backward()
    opt.step()
    return module, x, opt


def test_resampling_revives_killed_atoms():
    module, x, opt = killed_module("relu", {"l1_coeff": 0.01})
    assert (module.dictionary.encode_normalised(x)[:, :16] == 0).all()
    before = module.dictionary.W_dec[16:].detach().clone()
    assert module.resample(x, opt, duplicate_cos=0.99) >= 16
    codes = module.dictionary.encode_normalised(x)
    assert (codes[:, :16] > 0).any(dim=0).all()  # every killed atom fires again
    torch.testing.assert_close(module.dictionary.W_dec[16:], before)  # live atoms untouched
    assert (opt.state[module.dictionary.W_dec]["exp_avg"][:16] == 0).all()
    assert (opt.state[module.dictionary.W_dec]["exp_avg_sq"][:16] == 0).all()
    assert not module.dead_mask().any()


@pytest.mark.parametrize("variant", ["relu_tied", "relu"])
def test_resampling_works_for_both_relu_variants(variant):
    module, x, opt = killed_module(variant, {"l1_coeff": 0.01})
    module.resample(x, opt, duplicate_cos=0.99)
    assert (module.dictionary.encode_normalised(x)[:, :16] > 0).any(dim=0).all()


def test_auxk_gives_dead_features_gradient():
    """The AuxK term trains the dead latents (and only them) to reconstruct the residual."""
    module, x, _ = killed_module("topk", {"k": 4}, bias=-0.3)
    d = module.dictionary

    def grads(dead):
        d.zero_grad()
        out = d.loss(x, dead=dead)
        out["loss"].backward()
        return out["aux"].item(), d.W_dec.grad.clone(), d.W_enc.grad.clone()

    aux, dec_with, enc_with = grads(module.dead_mask())
    no_aux, dec_without, enc_without = grads(None)
    assert aux > 0 and no_aux == 0
    for with_aux, without in ((dec_with, dec_without), (enc_with, enc_without)):
        assert (with_aux - without)[:16].abs().sum(-1).gt(0).all()
        torch.testing.assert_close(with_aux[16:], without[16:])


def test_duplicate_atoms_marks_the_later_of_each_pair():
    from sae.module import duplicate_atoms

    atoms = torch.nn.functional.normalize(torch.randn(10, 64), dim=-1)
    atoms[7] = atoms[2]
    atoms[9] = torch.nn.functional.normalize(atoms[2] + 0.01 * torch.randn(64), dim=0)
    assert duplicate_atoms(atoms, 0.99, chunk=3).nonzero().flatten().tolist() == [7, 9]
