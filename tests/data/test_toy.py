"""Toy data with planted features: recovery, MMCS, resampling, AuxK and bad settings."""

import json

import pytest
import torch
from conftest import TEST_HPARAMS, run_cli, toy_data

import sae
from sae.dictionaries import build
from sae.errors import ConfigError
from sae.evaluation.metrics import dictionary_mmcs, mmcs, recovered_fraction


def test_toy_statistics():
    toy = toy_data(n_features=64, d=32, avg_active=4, decay=0.97, seed=1)
    torch.testing.assert_close(toy.features.norm(dim=-1), torch.ones(64))
    x = toy.sample(20000)
    assert x.shape == (20000, 32)
    # codes fire independently with probability p_i, magnitudes uniform in [0, 1):
    # E[c_i²] = p_i / 3, E[c_i c_j] = p_i p_j / 4
    p, gram = toy.probs, toy.features @ toy.features.T
    expected = (p / 3).sum() + ((p[:, None] * p[None, :] / 4) * gram).sum() - (p * p / 4).sum()
    assert x.pow(2).sum(-1).mean().item() == pytest.approx(expected.item(), rel=0.03)
    firing = toy._firing(20000, torch.Generator().manual_seed(0)).float()
    assert firing.sum(-1).mean().item() == pytest.approx(4, rel=0.05)
    assert firing.mean(0)[0] > firing.mean(0)[-1] * 2  # frequencies decay with the index


def test_correlated_toy_keeps_marginals_and_correlates():
    toy = toy_data(n_features=64, d=32, avg_active=4, correlated=True, seed=2)
    firing = toy._firing(40000, torch.Generator().manual_seed(0)).float()
    torch.testing.assert_close(firing.mean(0), toy.probs, atol=0.01, rtol=0.1)
    corr = torch.corrcoef(firing[:, :16].T)
    assert (corr - torch.eye(16)).abs().max() > 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_ground_truth_is_not_the_dictionarys_initial_atoms(seed):
    """`seed` seeds torch's global generator, which draws a dictionary's random atoms; the ground truth of
    `data.seed` with the same number must come from another stream, or training starts at the answer."""
    torch.manual_seed(seed)
    fresh = build("relu_tied", 32, 64, l1_coeff=0.0).decoder_weight().detach()
    assert mmcs(toy_data(n_features=64, d=32, seed=seed).features, fresh) < 0.7


def test_mmcs_of_itself_is_one_and_random_is_low(tmp_path):
    d = build("relu_tied", 32, 128, l1_coeff=0.01)
    sae.save_dictionary(d, tmp_path, {})
    assert dictionary_mmcs(tmp_path, d) == pytest.approx(1.0)
    toy = toy_data(n_features=64, d=32)
    assert mmcs(toy.features, d.decoder_weight().detach()) < 0.7
    assert recovered_fraction(toy.features, toy.features[:32]) == 0.5


@pytest.mark.parametrize("data", ["data.d=0", "data.avg_active=600"])
def test_bad_toy_settings(tmp_path, data):
    proc = run_cli("train.py", "experiment=toy", data, "logger=csv", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert not (tmp_path / "metrics.json").exists()


def test_more_active_than_features():
    with pytest.raises(ConfigError, match="cannot be reached"):
        toy_data(n_features=8, d=4, avg_active=9)


@pytest.mark.parametrize("variant", ["relu_tied", "topk"])
def test_small_toy_run_recovers_planted_features(tmp_path, variant):
    extra = ["sae=topk", "sae.k=4"] if variant == "topk" else []
    proc = run_cli(
        "train.py", "experiment=toy", *extra, "data.n_features=32", "data.d=32", "data.avg_active=3",
        "sae.ratio=2", "train.tokens=384000", "data.eval_tokens=4096", "logger=csv", f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    truth = toy_data(n_features=32, d=32).features
    torch.manual_seed(0)
    random_mmcs = mmcs(truth, build(variant, 32, 64, **TEST_HPARAMS[variant]).decoder_weight().detach())
    # measured at 1,500 steps: relu_tied 0.97, topk 0.999, a random dictionary 0.40
    assert m["mmcs"] > max(0.9, random_mmcs + 0.35)
    if variant == "topk":
        assert m["frac_recovered"] > 0.95
    assert sae.load(tmp_path).n_features == 64 and (tmp_path / "ground_truth.safetensors").is_file()
    # the paper's proxy works on training checkpoints too: the last one holds the dictionary that was saved
    assert dictionary_mmcs(tmp_path / "checkpoints" / "last.ckpt", tmp_path) == pytest.approx(1.0, abs=1e-5)


def test_toy_sweep_writes_table_and_heat_maps(tmp_path):
    proc = run_cli("experiments/toy_sweep.py", "--out", str(tmp_path), "--l1", "0.1", "0.5", "--ratios", "1",
                   "--steps", "40", "data.n_features=32", "data.d=16", "data.eval_tokens=512", "train.init_tokens=512")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (tmp_path / "toy_sweep.csv").read_text().splitlines()
    assert rows[0].startswith("l1_coeff,ratio,mmcs") and len(rows) == 3
    assert (tmp_path / "mmcs.png").stat().st_size > 0 and (tmp_path / "dead_frac.png").is_file()
    assert "best: l1_coeff=" in proc.stdout


def test_toy_sweep_reports_every_problem_before_training(tmp_path):
    (tmp_path / "runs" / "l1=0.1_ratio=1").mkdir(parents=True)
    (tmp_path / "runs" / "l1=0.1_ratio=1" / "status.json").write_text('{"state": "finished"}')
    proc = run_cli("experiments/toy_sweep.py", "--out", str(tmp_path), "--l1", "-1", "0.1", "--ratios", "1",
                   "data.d=0", "train.lr=0")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for problem in ("sae.l1_coeff=-1.0 must be >= 0", "data.d > 0", "train.lr=0.0 must be > 0", "already holds a run"):
        assert problem in lines[0]
    assert lines[0].count("train.lr=0.0 must be > 0") == 1  # said once, not once per cell
    assert not (tmp_path / "toy_sweep.csv").exists() and len(list((tmp_path / "runs").iterdir())) == 1

