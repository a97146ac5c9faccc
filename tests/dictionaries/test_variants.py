"""BatchTopK, JumpReLU, Gated and Matryoshka dictionaries: a real train → evaluate → export → import cycle for each,
and each variant's own arithmetic (straight-through gradients, batch selection, prefix and auxiliary losses) by hand."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, needs_fixtures, run_cli, tiny_overrides, toy_data, write_saelens_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

import sae
from sae.data.toy import ToyData
from sae.dictionaries.batchtopk import batch_topk
from sae.dictionaries.jumprelu import JumpReLU, Step
from sae.errors import ConfigError
from sae.io.saelens import export_saelens, load_saelens
from sae.training.objectives import reconstruction_loss
from sae.training.plan import variant_hparams


def variant_yaml(variant: str):
    """conf/sae/<variant>.yaml: the one default of each of the variant's settings."""
    return OmegaConf.load(ROOT / "conf" / "sae" / f"{variant}.yaml")


def loss_terms(d, x, dead=None) -> dict:
    """The objective's loss and terms of ``d`` on ``x`` (the trainer's ``reconstruction_loss``)."""
    loss, terms = reconstruction_loss(d, x, dead)
    return {**terms, "loss": loss}

NEW = ["batchtopk", "jumprelu", "gated", "matryoshka"]
SPARSITY = {"batchtopk": "k:8", "matryoshka": "k:8", "jumprelu": "l0_coeff:0.001", "gated": "l1_coeff:0.01"}
# resampling every 4 steps with atoms at cosine > 0.3 counting as duplicates, so that every variant re-seeds atoms
RESAMPLE = ["train.resample_every=4", "train.dead_window=256", "train.resample_until=0.9", "train.duplicate_cos=0.3"]


def defaults(variant: str, **override) -> dict:
    """The variant's hyperparameters from ``conf/sae/<variant>.yaml`` (the only place they have defaults)."""

    return {**variant_hparams(variant_yaml(variant)), **override}


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_set(tiny_lm_dir, tiny_text, tmp_path_factory):
    """One run training all four variants at one hook, as a set (each trains as it would alone)."""
    run_dir = tmp_path_factory.mktemp("variants")
    entries = ",".join(f"{{name:{v},sae:{{variant:{v},{SPARSITY[v]}}}}}" for v in NEW)
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, run_dir, *RESAMPLE), f"dictionaries=[{entries}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_train_resamples_and_saves_every_variant(trained_set):
    rows = _rows(trained_set / "csv" / "metrics.csv")
    for variant in NEW:
        meta = json.loads((trained_set / variant / "sae.json").read_text())
        assert meta["variant"] == variant and meta["n_features"] == 128
        metrics = json.loads((trained_set / variant / "metrics.json").read_text())
        # (re-seeding most atoms every 4 steps leaves a poor reconstruction after 32 steps, as it does for ReLU)
        assert math.isfinite(metrics["fvu"]) and 0 < metrics["l0"] < 128 and math.isfinite(metrics["kl_spliced"])
        assert sum(float(r.get(f"{variant}/train/resampled") or 0) for r in rows) > 0, variant
    assert float(sae.load(trained_set / "batchtopk").threshold) > 0  # the inference threshold was estimated and saved


def test_evaluate_export_import(trained_set, tiny_lm_dir, tiny_text):
    proc = run_cli("evaluate.py", f"run={trained_set}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = {r["name"]: r for r in _rows(trained_set / "eval" / "eval.csv")}
    lens = trained_set / "lens"
    x = 3 * torch.randn(200, 32)
    for variant in NEW:
        trained = json.loads((trained_set / variant / "metrics.json").read_text())
        assert float(evaluated[variant]["kl_spliced"]) == pytest.approx(trained["kl_spliced"], rel=1e-4)
        export_saelens(trained_set / variant, lens / variant)
        imported, _ = load_saelens(lens / variant)
        ours = sae.load(trained_set / variant)
        with torch.no_grad():
            torch.testing.assert_close(imported.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(imported(x), ours(x), rtol=1e-5, atol=1e-5)
        cfg = json.loads((lens / variant / "cfg.json").read_text())
        assert cfg["architecture"] == ("gated" if variant == "gated" else "jumprelu")
    proc = run_cli("evaluate.py", f"run={lens}", f"model.name_or_path={tiny_lm_dir}", "data.source=files",
                   f"data.path={tiny_text}", "data.context_length=32", "eval_tokens=512")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in _rows(lens / "eval" / "eval.csv"):
        trained = json.loads((trained_set / row["name"] / "metrics.json").read_text())
        assert float(row["kl_spliced"]) == pytest.approx(trained["kl_spliced"], rel=1e-3), row["name"]
        assert float(row["l0"]) == pytest.approx(trained["l0"]), row["name"]


def test_export_cli(trained_set, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sae.io.saelens", str(trained_set / "gated"), str(tmp_path / "lens")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(load_file(str(tmp_path / "lens" / "sae_weights.safetensors"))) == {
        "W_enc",
        "W_dec",
        "b_dec",
        "b_gate",
        "b_mag",
        "r_mag",
    }


# --- JumpReLU -------------------------------------------------------------------------------------------------

def test_jumprelu_straight_through_gradients_by_hand():
    eps = 0.1
    threshold = torch.tensor([0.5, 1.0], requires_grad=True)
    pre = torch.tensor([[0.52, 2.0], [0.3, 0.97], [0.56, 1.06]], requires_grad=True)
    # inside the window |pre - θ| < ε/2: (0,0) 0.52, (1,1) 0.97; (2,0) 0.56 and (2,1) 1.06 are outside
    upstream = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = JumpReLU.apply(pre, threshold, eps)
    torch.testing.assert_close(out, torch.tensor([[0.52, 2.0], [0.0, 0.0], [0.56, 1.06]]))
    grad_pre, grad_threshold = torch.autograd.grad(out, (pre, threshold), upstream)
    torch.testing.assert_close(grad_pre, upstream * torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    # ∂/∂θ_j = Σ_b −(θ_j/ε) K((pre − θ_j)/ε) · upstream: feature 0 from row 0 (1.0), feature 1 from row 1 (4.0)
    torch.testing.assert_close(grad_threshold, torch.tensor([-(0.5 / eps) * 1.0, -(1.0 / eps) * 4.0]))
    step = Step.apply(pre, threshold, eps)
    torch.testing.assert_close(step, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    grad_pre, grad_threshold = torch.autograd.grad(step.sum(), (pre, threshold), allow_unused=True)
    assert grad_pre is None or not grad_pre.any()
    torch.testing.assert_close(grad_threshold, torch.tensor([-1 / eps, -1 / eps]))


def test_jumprelu_l0_penalty_gradient_through_the_dictionary():
    torch.manual_seed(0)
    eps, coeff = 0.05, 0.3
    d = sae.build("jumprelu", 8, 16, l0_coeff=coeff, bandwidth=eps, init_threshold=0.1)
    x = 0.3 * torch.randn(64, 8)
    out = loss_terms(d, x)
    pre = d.pre_activations(x).detach()
    theta = d.threshold().detach()
    assert out["sparsity"].item() == pytest.approx(coeff * (pre > theta).float().sum(-1).mean().item(), rel=1e-6)
    torch.testing.assert_close(out["codes"], pre * (pre > theta))
    (grad,) = torch.autograd.grad(out["sparsity"], d.log_threshold)
    window = ((pre - theta).abs() < eps / 2).float()
    by_hand = theta * coeff * (-(1 / eps) * window).sum(0) / len(x)  # chain rule through θ = exp(log θ)
    torch.testing.assert_close(grad, by_hand)
    assert window.sum() > 0  # the test would not see the kernel otherwise


# --- BatchTopK ------------------------------------------------------------------------------------------------

def test_batch_topk_keeps_k_per_input_on_average():
    torch.manual_seed(0)
    d = sae.build("batchtopk", 16, 64, **defaults("batchtopk", k=2.5))
    d.init_from_data(torch.randn(512, 16))
    x = torch.randn(64, 16) / d.scale
    codes = loss_terms(d, x)["codes"].to_dense()
    per_input = (codes != 0).sum(-1)
    assert per_input.sum() == 160 and per_input.float().mean() == 2.5 and per_input.min() < per_input.max()
    pre = torch.relu(d.pre_activations(x)).detach()
    kept = pre.flatten().topk(160).values
    torch.testing.assert_close(codes.flatten().sort().values[-160:], kept.sort().values)  # the batch's largest
    kept_pre, smallest = batch_topk(d.pre_activations(x).detach(), 2.5)
    assert smallest == kept.min() and float(d.threshold) == pytest.approx(float(smallest))  # the first step sets θ


def _train_on_toy(variant: str, steps: int, **hparams) -> tuple[sae.Dictionary, ToyData]:
    torch.manual_seed(0)
    toy = toy_data(n_features=64, d=32, avg_active=3)
    d = sae.build(variant, 32, 64, **defaults(variant, **hparams))
    d.init_from_data(toy.sample(4096))
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    for _ in range(steps):
        out = loss_terms(d, toy.sample(256) / d.scale)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return d, toy


def test_batch_topk_inference_threshold_gives_l0_near_k_on_heldout():
    d, toy = _train_on_toy("batchtopk", 300, k=4, threshold_lr=0.05)
    train_l0 = (loss_terms(d, toy.sample(256) / d.scale)["codes"].to_dense() != 0).sum(-1).float().mean().item()
    with torch.no_grad():
        heldout_l0 = (d.encode(toy.sample(8192)) != 0).sum(-1).float().mean().item()
    assert train_l0 == 4 and heldout_l0 == pytest.approx(4, rel=0.15)
    before = float(d.threshold)
    d.calibrate_threshold_(toy.sample(8192) / d.scale, 256)
    assert float(d.threshold) == pytest.approx(before, rel=0.1)


# --- Matryoshka -----------------------------------------------------------------------------------------------

def test_matryoshka_prefix_losses_and_gradients_by_hand():
    torch.manual_seed(0)
    d = sae.build("matryoshka", 12, 40, **defaults("matryoshka", k=3, prefixes=[0.1, 0.25, 0.5]))
    d.init_from_data(2 + torch.randn(256, 12))
    x = torch.randn(32, 12) / d.scale + d.b_dec
    assert d.widths == [4, 10, 20]

    def dense_reference():
        pre = d.pre_activations(x)
        mask = torch.zeros(pre.numel(), dtype=torch.bool)
        mask[torch.relu(pre).detach().flatten().topk(3 * 32).indices] = True
        codes = torch.relu(pre) * mask.view_as(pre)
        atoms = d.decoder_weight()
        full = ((codes @ atoms + d.b_dec - x) ** 2).sum(-1).mean()
        inner = sum(((codes[:, :m] @ atoms[:m] + d.b_dec - x) ** 2).sum(-1).mean() for m in (4, 10, 20))
        return full, inner

    def grads(loss):
        d.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in d.named_parameters()}

    out = loss_terms(d, x)  # no dead features: no AuxK term, so aux is the inner prefixes' errors alone
    full, inner = dense_reference()
    assert out["mse"].item() == pytest.approx(full.item(), rel=1e-5)
    assert out["aux"].item() == pytest.approx(inner.item(), rel=1e-5)
    sparse, dense = grads(out["loss"]), grads(sum(dense_reference()))
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], msg=name)


def test_matryoshka_refuses_bad_prefixes():
    for prefixes, message in (
        ([0.5, 0.25], "strictly increasing"),
        ([0.5, 1.0], "in \\(0, 1\\)"),
        ([0.001, 0.002], "strictly"),
    ):
        with pytest.raises(ConfigError, match=message):
            sae.build("matryoshka", 8, 64, **defaults("matryoshka", prefixes=prefixes))


def test_bad_hyperparameter_is_one_line(tiny_lm_dir, tiny_text, tmp_path):
    proc = run_cli(
        "train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), "sae=matryoshka", "sae.prefixes=[0.5,0.25]"
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines[-1].startswith("error: ") and "strictly increasing" in lines[-1]


# --- Gated ----------------------------------------------------------------------------------------------------

def test_gated_terms_by_hand():
    torch.manual_seed(0)
    d = sae.build("gated", 6, 20, l1_coeff=0.25)
    with torch.no_grad():
        for p in (d.b_gate, d.b_mag, d.r_mag, d.b_dec):
            p.normal_(0, 0.3)
    x = torch.randn(16, 6)
    out = loss_terms(d, x)
    centred = x - d.b_dec
    pi_gate = centred @ d.W_enc.T + d.b_gate
    pi_mag = centred @ (d.W_enc * d.r_mag.exp()[:, None]).T + d.b_mag
    atoms = d.W_dec / d.W_dec.norm(dim=-1, keepdim=True)
    codes = (pi_gate > 0).float() * torch.relu(pi_mag)
    torch.testing.assert_close(out["codes"], codes.detach())
    torch.testing.assert_close(out["x_hat"], codes @ atoms + d.b_dec)
    assert out["sparsity"].item() == pytest.approx(0.25 * torch.relu(pi_gate).sum(-1).mean().item(), rel=1e-6)
    aux = ((torch.relu(pi_gate) @ atoms + d.b_dec - x) ** 2).sum(-1).mean()
    assert out["aux"].item() == pytest.approx(aux.item(), rel=1e-6)
    # the aux term decodes through a frozen decoder: no gradient to W_dec, none to the magnitude path, and b_dec's
    # only through the encoder's input x − b_dec: −Σ_batch (∂aux/∂π_gate) W_enc
    grads = torch.autograd.grad(
        out["aux"], [d.W_dec, d.W_enc, d.b_gate, d.b_mag, d.r_mag], allow_unused=True, retain_graph=True
    )
    assert [g is not None and bool(g.any()) for g in grads] == [False, True, True, False, False]
    (grad_b_dec,) = torch.autograd.grad(out["aux"], d.b_dec)
    d_pi = (2 / len(x)) * ((torch.relu(pi_gate) @ atoms + d.b_dec - x) @ atoms.T) * (pi_gate > 0)
    torch.testing.assert_close(grad_b_dec, -(d_pi @ d.W_enc).sum(0).detach())


# --- resampling and SAELens -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", NEW)
def test_reinit_atoms_resets_every_per_atom_parameter(variant):
    torch.manual_seed(0)
    d = sae.build(variant, 8, 32, **defaults(variant))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    idx = torch.tensor([3, 17])
    d.reinit_atoms_(idx, torch.randn(2, 8))
    per_atom = {n for n, p in d.named_parameters() if any(p is q for q in d.atom_parameters())}
    assert per_atom == {n for n, p in d.named_parameters() if p.shape[0] == 32}
    alive = torch.ones(32, dtype=torch.bool)
    alive[idx] = False
    for name in per_atom:
        p = getattr(d, name)
        assert not torch.equal(p[idx], before[name][idx]), name  # re-seeded ...
        torch.testing.assert_close(p[alive], before[name][alive])  # ... and only those
    zero_bias = (
        {"b_enc"} if variant in ("batchtopk", "matryoshka") else set()
    )  # TopK's re-seeding: bias 0, AuxK trains it
    for name in per_atom - {"W_dec", "W_enc"}:
        expected = 0.0 if name in zero_bias else before[name][alive].median()
        assert (getattr(d, name)[idx] == expected).all(), name  # else a typical live atom's value


@needs_fixtures
def test_saelens_jumprelu_fixture():
    directory = FIXTURES / "saelens" / "jumprelu"
    ref = load_file(str(FIXTURES / "saelens" / "reference.safetensors"))
    imported, meta = load_saelens(directory)
    assert imported.variant == "jumprelu" and meta["hook"] == {"layer": 3, "site": "resid"}
    norms = load_file(str(directory / "sae_weights.safetensors"))["W_dec"].norm(dim=1)
    with torch.no_grad():
        codes, reconstruction = imported.encode(ref["input"]), imported(ref["input"])
    # our codes are SAELens's times each atom's decoder norm over the mean norm (our atoms are unit-norm)
    torch.testing.assert_close(codes / (norms / norms.mean()), ref["jumprelu.codes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(reconstruction, ref["jumprelu.reconstruction"], rtol=0, atol=1e-5)
    assert torch.equal(codes != 0, ref["jumprelu.codes"] != 0)


def test_saelens_gated_formula_with_unequal_norms_and_no_b_dec_on_input(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = {
        "W_enc": torch.randn(8, 24, generator=gen),
        "W_dec": 3 * torch.rand(24, 1, generator=gen) * torch.randn(24, 8, generator=gen),
        "b_gate": torch.randn(24, generator=gen),
        "b_mag": torch.randn(24, generator=gen),
        "r_mag": 0.3 * torch.randn(24, generator=gen),
        "b_dec": torch.randn(8, generator=gen),
    }
    write_saelens_dir(
        tmp_path,
        w,
        {
            "architecture": "gated",
            "d_in": 8,
            "d_sae": 24,
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "model_name": "m",
            "hook_name": "blocks.2.hook_resid_post",
        },
    )
    loaded, _ = load_saelens(tmp_path)
    x = torch.randn(50, 8, generator=gen)
    gate = (x @ w["W_enc"] + w["b_gate"]) > 0
    codes = gate * torch.relu(x @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), codes @ w["W_dec"] + w["b_dec"], rtol=1e-4, atol=1e-4)
        assert torch.equal(loaded.encode(x) != 0, codes != 0)


def test_default_names_carry_each_variants_sparsity():

    from sae.training.plan import default_name

    names = [default_name(None, variant_yaml(v)) for v in NEW]
    assert names == ["toy.batchtopk.x4.k32", "toy.jumprelu.x4.l0_0.01", "toy.gated.x4.l1_0.04", "toy.matryoshka.x4.k32"]
