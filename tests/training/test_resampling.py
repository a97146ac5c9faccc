"""Dead atoms come back: resampling (which atoms, re-seeded with what, from which inputs), and AuxK for TopK."""

import pytest
import torch
from conftest import toy_data

from sae.data.toy import ToyData
from sae.training.module import TrainedDictionary
from sae.training.objectives import reconstruction_loss
from sae.training.resampling import pick_inputs, unexplained


def killed_module(
    variant: str, hparams: dict, bias: float = -100.0
) -> tuple[TrainedDictionary, torch.Tensor, torch.optim.Optimizer]:
    """A dictionary on toy data with its first 16 atoms killed (encoder bias ``bias``) and marked dead."""
    cfg = {"variant": variant, "d_in": 16, "n_features": 64, **hparams}
    module = TrainedDictionary(None, "toy", cfg, seed=0, dead_window=1000, resample_pool=0)
    d = module.dictionary
    x = toy_data(n_features=32, d=16, avg_active=3).sample(2048)
    d.init_from_data(x)
    x = x / d.scale
    with torch.no_grad():
        d.b_enc[:16] = bias
    module.tokens_since_fired[:16] = 10_000
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    reconstruction_loss(d, x)[0].backward()
    opt.step()
    return module, x, opt


def resample_until_none_dead(module: TrainedDictionary, opt: torch.optim.Optimizer, tries: int = 10) -> int:
    """Resample as the schedule does: each call sees new inputs and re-seeds the dead atoms it finds inputs for."""
    toy, revived = toy_data(n_features=32, d=16, avg_active=3), 0
    for t in range(tries):
        revived += module.resample(
            toy.sample(2048, torch.Generator().manual_seed(t)) / module.dictionary.scale, opt, 0.99
        )
        if not module.dead_mask().any():
            break
    return revived


def test_resampling_revives_killed_atoms():
    module, x, opt = killed_module("relu", {"l1_coeff": 0.01})
    assert (module.dictionary.encode_normalised(x)[:, :16] == 0).all()
    before = module.dictionary.W_dec[16:].detach().clone()
    assert resample_until_none_dead(module, opt) >= 16
    codes = module.dictionary.encode_normalised(x)
    assert (codes[:, :16] > 0).any(dim=0).all()  # every killed atom fires again
    torch.testing.assert_close(module.dictionary.W_dec[16:], before)  # live atoms untouched
    assert (opt.state[module.dictionary.W_dec]["exp_avg"][:16] == 0).all()
    assert (opt.state[module.dictionary.W_dec]["exp_avg_sq"][:16] == 0).all()
    assert not module.dead_mask().any()


@pytest.mark.parametrize("variant", ["relu_tied", "relu"])
def test_resampling_works_for_both_relu_variants(variant):
    module, x, opt = killed_module(variant, {"l1_coeff": 0.01})
    resample_until_none_dead(module, opt)
    assert (module.dictionary.encode_normalised(x)[:, :16] > 0).any(dim=0).all()


def test_auxk_gives_dead_features_gradient():
    """The AuxK term trains the dead latents (and only them) to reconstruct the residual."""
    module, x, _ = killed_module("topk", {"k": 4, "aux_coeff": 1 / 32, "k_aux": None}, bias=-0.3)
    d = module.dictionary

    def grads(dead):
        d.zero_grad()
        loss, out = reconstruction_loss(d, x, dead)
        loss.backward()
        return out["aux"].item(), d.W_dec.grad.clone(), d.W_enc.grad.clone()

    aux, dec_with, enc_with = grads(module.dead_mask())
    no_aux, dec_without, enc_without = grads(None)
    assert aux > 0 and no_aux == 0
    for with_aux, without in ((dec_with, dec_without), (enc_with, enc_without)):
        assert (with_aux - without)[:16].abs().sum(-1).gt(0).all()
        torch.testing.assert_close(with_aux[16:], without[16:])


def test_duplicate_atoms_marks_the_later_of_each_pair():
    from sae.training.resampling import duplicate_atoms

    atoms = torch.nn.functional.normalize(torch.randn(10, 64), dim=-1)
    atoms[7] = atoms[2]
    atoms[9] = torch.nn.functional.normalize(atoms[2] + 0.01 * torch.randn(64), dim=0)
    assert duplicate_atoms(atoms, 0.99, chunk=3).nonzero().flatten().tolist() == [7, 9]


def test_unexplained_keeps_only_what_no_atom_explains():
    """Known atoms (even several at once, as L1 shrinkage or TopK leave them) are fitted away; a direction no
    atom has is what remains."""
    basis = torch.eye(64)
    atoms = basis[:32]
    known = 0.3 * (basis[1] + basis[2] + basis[3]) + 0.2 * basis[7]
    novel = 0.5 * basis[0] + 0.8 * basis[40]
    r = unexplained(torch.stack([known, novel]), atoms, torch.zeros(64))
    assert r[0].norm() < 1e-3
    torch.testing.assert_close(r[1], 0.8 * basis[40], atol=1e-3, rtol=0)


def test_pick_inputs_draws_only_what_stands_out():
    norms = torch.full((100,), 0.1)
    assert len(pick_inputs(norms, 5)) == 0  # nothing stands out: no atom is pointed at noise
    norms[[7, 42]] = 1.0
    assert sorted(pick_inputs(norms, 5).tolist()) == [7, 42]


def test_when_nothing_is_explained_every_input_is_a_candidate():
    """A dictionary that explains little (most atoms dead) leaves every input with a large unexplained part, so
    none stands out from the median; the floor (half the inputs' typical norm) still lets atoms be re-seeded."""
    norms = 1.0 + 0.01 * torch.rand(100)
    assert len(pick_inputs(norms, 5)) == 0
    assert len(pick_inputs(norms, 5, floor=0.5)) == 5


def planted_module(n: int = 96, d: int = 64, pool: int = 0) -> tuple[TrainedDictionary, ToyData, torch.optim.Optimizer]:
    """A tied dictionary whose atoms are the ground truth except that the last duplicates atom 3: the last feature
    has no atom."""
    toy = toy_data(n_features=n, d=d, avg_active=3, seed=3)
    module = TrainedDictionary(None, "toy", {"variant": "relu_tied", "d_in": d, "n_features": n, "l1_coeff": 0.1},
                               seed=0, dead_window=10**9, resample_pool=pool)
    dictionary = module.dictionary
    dictionary.init_from_data(toy.sample(4096))
    with torch.no_grad():
        dictionary.W_dec.copy_(toy.features)
        dictionary.W_dec[n - 1] = toy.features[3]
        dictionary.b_enc.copy_(-0.1 * torch.rand(n))
    return module, toy, torch.optim.Adam(dictionary.parameters(), lr=1e-3)


def test_duplicate_is_reseeded_onto_the_feature_no_atom_has():
    """Resampling points the duplicate at the unclaimed feature (a tied atom gets the live atoms' median bias)."""
    module, toy, opt = planted_module()
    d, last = module.dictionary, 95
    median = d.b_enc[:last].median().item()
    assert module.resample(toy.sample(2048) / d.scale, opt, duplicate_cos=0.9) == 1
    cos = toy.features @ d.decoder_weight()[last]
    assert cos.argmax() == last and cos[last] > 0.7  # the fit on nearby atoms takes a little of it
    assert d.b_enc[last].item() == pytest.approx(median)
    torch.testing.assert_close(d.W_dec[:last], toy.features[:last])


def mixtures(toy: ToyData, n: int, seed: int, with_last: bool) -> torch.Tensor:
    """``n`` sparse mixtures of the toy features, the last feature in all of them or in none."""
    gen = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, len(toy.features), generator=gen) < 0.03) * torch.rand(n, len(toy.features), generator=gen)
    codes[:, -1] = 0.5 + 0.5 * torch.rand(n, generator=gen) if with_last else 0.0
    return codes @ toy.features


@pytest.mark.parametrize("pool", [0, 1024])
def test_resampling_draws_from_the_pool_of_recent_inputs(pool):
    """The unclaimed feature fired in an earlier batch, not in this one: with a pool of recent inputs the duplicate
    is pointed at it; with none, nothing in this batch stands out and the atom waits."""
    module, toy, opt = planted_module(pool=pool)
    scale = module.dictionary.scale
    module.remember(mixtures(toy, 32, 0, with_last=True) / scale)
    for seed in range(1, 4):
        module.remember(mixtures(toy, 256, seed, with_last=False) / scale)
    batch = {"toy": mixtures(toy, 256, 9, with_last=False)}
    revived = module.resample(module.resampling_inputs(batch), opt, duplicate_cos=0.9)
    cos = toy.features @ module.dictionary.decoder_weight()[-1]
    if pool:
        assert revived == 1 and cos.argmax() == 95 and cos[95] > 0.7
    else:
        assert revived == 0 and cos[3] > 0.99  # still the duplicate of atom 3


def test_remember_keeps_the_latest_inputs():
    module = TrainedDictionary(None, "toy", {"variant": "relu", "d_in": 2, "n_features": 4, "l1_coeff": 0.0}, seed=0,
                               dead_window=1000, resample_pool=4)
    module.remember(torch.arange(6.0).view(3, 2))
    module.remember(torch.arange(6.0, 12.0).view(3, 2))
    kept = sorted(module.resampling_inputs({}).tolist())
    assert kept == [[4.0, 5.0], [6.0, 7.0], [8.0, 9.0], [10.0, 11.0]]
    module.remember(torch.arange(100.0, 110.0).view(5, 2))  # more than the pool holds: its last 4 rows
    assert sorted(module.resampling_inputs({}).tolist())[0] == [102.0, 103.0]
