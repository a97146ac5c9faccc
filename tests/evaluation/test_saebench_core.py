"""SAEBench's core metrics (sae_bench/evals/core/main.py, 0.6.0) by hand: each against a computation written out
here from its definition, on batches of activations and through the held-out pass of a tiny model, for a dictionary
that reconstructs exactly and one whose reconstruction is exactly zero; the core JSON against SAEBench's schema."""

import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from conftest import tiny_model

from sae.baselines import fit
from sae.evaluation.heldout import heldout_metrics_many
from sae.evaluation.saebench import CoreSums, core_output, density_metrics
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture, token_mask

SCHEMA = Path(__file__).parents[1] / "schemas" / "saebench_core.schema.json"
HOOK = HookPoint(1, "resid")


def by_hand(batches):
    """SAEBench's formulas, written out with numpy over a list of (x, x_hat, codes) batches."""
    x_all = np.concatenate([b[0] for b in batches])
    out = {"l2_norm_in": [], "l2_norm_out": [], "l2_ratio": [], "l0": [], "l1": [], "mse": [], "cossim": [],
           "legacy": []}
    rrb, mean_sq, mean_sq_dim, mean_resid = [], [], [], []
    for x, x_hat, codes in batches:
        n_in, n_out = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
        resid = ((x - x_hat) ** 2).sum(1)
        out["l2_norm_in"] += list(n_in)
        out["l2_norm_out"] += list(n_out)
        out["l2_ratio"] += list(n_out / np.where(np.abs(n_in) < 1e-4, 1, n_in))
        rrb.append((n_out ** 2).mean() / (x * x_hat).sum(1).mean())
        out["l0"] += list((codes != 0).sum(1))
        out["l1"] += list(codes.sum(1))
        out["mse"] += list(resid / len(x))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["cossim"] += list(np.nan_to_num((x * x_hat).sum(1) / (n_in * n_out)))
        out["legacy"] += list(1 - resid / ((x - x.mean(0)) ** 2).sum(1))
        mean_sq.append((x ** 2).sum(1).mean())
        mean_sq_dim.append((x ** 2).mean(0))
        mean_resid.append(resid.mean())
    total = np.mean(mean_sq) - np.concatenate(mean_sq_dim).mean() ** 2
    hand = {k: float(np.mean(v)) for k, v in out.items()}
    hand["relative_reconstruction_bias"] = float(np.mean(rrb))
    hand["explained_variance"] = float(1 - np.mean(mean_resid) / total)
    assert len(x_all) == sum(len(b[0]) for b in batches)
    return hand


def summed(batches):
    sums = CoreSums(batches[0][2].shape[1])
    for x, x_hat, codes in batches:
        sums.add(torch.tensor(x), torch.tensor(x_hat), torch.tensor(codes))
    m = sums.metrics()
    return {**m["reconstruction_quality"], **m["shrinkage"], **m["sparsity"], "density": m["density"]}


@pytest.mark.parametrize("case", ["noisy", "exact", "zero"])
def test_core_sums_match_the_hand_computation(case):
    rng = np.random.default_rng(0)
    batches = []
    for n in (12, 12):  # equal batches, as SAEBench's
        x = rng.normal(size=(n, 5)) + 2.0
        codes = np.maximum(rng.normal(size=(n, 7)), 0)
        x_hat = {"noisy": x + 0.3 * rng.normal(size=x.shape), "exact": x.copy(), "zero": np.zeros_like(x)}[case]
        batches.append((x, x_hat, codes))
    ours, hand = summed(batches), by_hand(batches)
    for key in ("l2_norm_in", "l2_norm_out", "l2_ratio", "l0", "l1", "mse", "cossim", "explained_variance"):
        assert ours[key] == pytest.approx(hand[key], rel=1e-9, abs=1e-12), key
    assert ours["explained_variance_legacy"] == pytest.approx(hand["legacy"], rel=1e-9)
    if case == "zero":  # SAEBench's 0/0: no bias is defined for a reconstruction of zero
        assert math.isnan(ours["relative_reconstruction_bias"]) and ours["cossim"] == 0 and ours["l2_ratio"] == 0
    else:
        assert ours["relative_reconstruction_bias"] == pytest.approx(hand["relative_reconstruction_bias"], rel=1e-9)
    if case == "exact":
        assert ours["explained_variance"] == 1 and ours["mse"] == 0 and ours["cossim"] == pytest.approx(1)
        assert ours["l2_ratio"] == pytest.approx(1) and ours["relative_reconstruction_bias"] == pytest.approx(1)


def test_density_metrics_by_hand():
    density = torch.tensor([0.0, 0.005, 0.02, 0.5], dtype=torch.float64)
    m = density_metrics(density)
    assert m["frac_alive"] == 0.75 and m["freq_over_1_percent"] == 0.5 and m["freq_over_10_percent"] == 0.25
    assert m["normalized_freq_over_1_percent"] == pytest.approx(0.52 / 0.525)
    assert m["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.525)


def kl_rows(clean_logits, logits):
    """KL(clean || other) at each next-token prediction, from log-softmaxes (the textbook formula)."""
    p = torch.log_softmax(clean_logits[:, :-1].double(), -1)
    q = torch.log_softmax(logits[:, :-1].double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def ce_rows(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="none")


def test_preservation_scores_through_the_heldout_pass_exact_and_zero_dictionaries():
    model = tiny_model().requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(2, 22, (6, 16))
    ids[:, 0] = 0
    special = [0]
    x = capture(model, [HOOK], ids)[HOOK][token_mask(ids, special)].float()
    exact = fit("neurons", x)  # the identity: reconstructs exactly
    zero = fit("neurons", x)
    zero.W_dec.zero_()
    zero.b_dec.data.zero_()
    metrics = heldout_metrics_many(model, {"exact": exact, "zero": zero}, HOOK, ids, special, batch_size=3,
                                   progress=False)
    # the zero-ablated run by hand: block 1's output replaced by zeros at ordinary positions
    keep = token_mask(ids, special)

    def zero_hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.where(keep.unsqueeze(-1), torch.zeros_like(hidden), hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    clean = model(ids).logits
    handle = model.gpt_neox.layers[1].register_forward_hook(zero_hook)
    ablated = model(ids).logits
    handle.remove()
    kl_zero, ce_zero = kl_rows(clean, ablated).mean(), ce_rows(ablated, ids).mean()
    ce_clean = ce_rows(clean, ids).mean()
    for name in ("exact", "zero"):
        core = metrics[name]["saebench"]
        behaviour, performance = core["model_behavior_preservation"], core["model_performance_preservation"]
        assert behaviour["kl_div_with_ablation"] == pytest.approx(kl_zero.item(), rel=1e-4)
        assert performance["ce_loss_with_ablation"] == pytest.approx(ce_zero.item(), rel=1e-5)
        assert performance["ce_loss_without_sae"] == pytest.approx(ce_clean.item(), rel=1e-5)
    exact_core, zero_core = metrics["exact"]["saebench"], metrics["zero"]["saebench"]
    assert exact_core["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1, abs=1e-5)
    assert exact_core["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1, abs=1e-4)
    assert exact_core["reconstruction_quality"]["explained_variance"] == pytest.approx(1, abs=1e-6)
    assert zero_core["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0, abs=1e-5)
    assert zero_core["model_performance_preservation"]["ce_loss_score"] == pytest.approx(0, abs=1e-5)
    assert zero_core["shrinkage"]["l2_norm_out"] == 0
    # ours beside SAEBench's: ce_loss_recovered is the same ratio (zero ablation at ordinary positions)
    assert metrics["exact"]["ce_loss_recovered"] == exact_core["model_performance_preservation"]["ce_loss_score"]
    meta = {"model": {"name_or_path": "tiny"}, "hook": {"layer": 1, "site": "resid"},
            "data": {"path": "text.jsonl", "context_length": 16}}
    for name, dictionary in (("exact", exact), ("zero", zero)):
        output = json.loads(json.dumps(core_output(name, meta, dictionary, metrics[name])))
        if name == "exact":  # the zero dictionary's undefined bias is null, which the schema's number refuses
            jsonschema.validate(output, json.loads(SCHEMA.read_text()))
        assert output["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(metrics[name]["l0"])
    zero_out = core_output("zero", meta, zero, metrics["zero"])
    assert zero_out["eval_result_metrics"]["shrinkage"]["relative_reconstruction_bias"] is None  # 0/0, not NaN


def test_max_other_cosine_in_blocks_equals_the_whole_matrix():
    """The decoder/encoder similarity is computed a block of rows at a time (the whole matrix is 8.6 GB at 32,768
    features): the same maxima, each row's own cosine (1) left out."""
    from sae.evaluation.saebench import max_other_cosine

    torch.manual_seed(0)
    rows = torch.randn(50, 6)
    rows[7] = 3 * rows[3]  # a parallel pair: both maxima are 1
    unit = torch.nn.functional.normalize(rows.double(), dim=-1)
    whole = (unit @ unit.T).fill_diagonal_(-float("inf")).max(-1).values
    blocked = max_other_cosine(rows, block_bytes=8 * 50 * 4)  # 4 rows a block
    torch.testing.assert_close(blocked, whole)
    assert blocked[3].item() == pytest.approx(1.0) and blocked[7].item() == pytest.approx(1.0)
