"""Metrics against hand computations, and splicing a perfect reconstruction changes nothing."""

import numpy as np
import pytest
import torch
from conftest import tiny_model

from sae.dictionaries import Dictionary
from sae.evaluation.heldout import heldout_metrics
from sae.evaluation.metrics import NextTokenScorer, fvu, l0
from sae.lm.hooks import HookPoint


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


def test_next_token_ce_and_kl_by_hand():
    clean, other = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    ids = torch.tensor([[0, 3, 1, 4], [2, 2, 0, 1]])
    logp, logq = torch.log_softmax(clean, -1)[:, :-1], torch.log_softmax(other, -1)[:, :-1]
    ce_by_hand = -logq.gather(-1, ids[:, 1:, None]).sum()
    kl_by_hand = (logp.exp() * (logp - logq)).sum()
    scorer = NextTokenScorer(clean, ids)
    ce, kl = scorer.ce_and_kl(other)
    assert ce == pytest.approx(ce_by_hand.item(), rel=1e-6) and scorer.ce(other) == ce
    assert kl == pytest.approx(kl_by_hand.item(), rel=1e-5)
    assert scorer.ce_and_kl(clean)[1] == pytest.approx(0.0, abs=1e-5)


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


class Half(Identity):
    """x_hat = x / 2: cosine 1, l2_ratio 1/2, every feature fires on every token."""

    def decoder_weight(self):
        return 0.5 * torch.eye(self.d_in)


def test_reconstruction_metrics_by_hand():
    from sae.lm.reader import capture as read_activations

    model, hook, ids = tiny_model(), HookPoint(1, "resid"), _contexts()
    x = read_activations(model, [hook], ids)[hook][:, 1:].reshape(-1, 32).double()
    m = heldout_metrics(model, Half(32, 32), hook, ids, [0], batch_size=4, progress=False)
    assert m["fvu"] == pytest.approx((0.25 * x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-5)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-6) and m["l2_ratio"] == pytest.approx(0.5, abs=1e-6)
    assert m["l0"] == 32 and m["dead_frac"] == 0.0 and m["dense_frac"] == 1.0
    assert m["l0_hist"]["counts"][-1] == len(x) and sum(m["l0_hist"]["counts"]) == len(x)
    assert m["ppl_clean"] == pytest.approx(np.exp(m["ce_clean"])) and m["ppl_spliced"] == pytest.approx(
        np.exp(m["ce_spliced"])
    )
    assert m["kl_spliced"] > 0 and m["ce_spliced"] != m["ce_clean"]


def test_density_summary_by_hand():
    from sae.evaluation.metrics import density_summary

    s = density_summary(torch.tensor([0.0, 1.0, 5.0, 10.0]), n_tokens=10)
    assert s["dead_frac"] == 0.25 and s["dense_frac"] == 0.5  # densities 0, 0.1, 0.5, 1; dense means > 0.1
    hist = s["log10_density_hist"]
    assert hist["edges"][0] == pytest.approx(-1.0) and hist["edges"][-1] == 0.0 and sum(hist["counts"]) == 3


class Mean(Identity):
    """Every input reconstructs to a fixed vector (set to the held-out mean in the test)."""

    def encode_normalised(self, x):
        return torch.zeros_like(x)


def test_mean_reconstruction_is_mean_ablation():
    from sae.lm.reader import read_rows

    model, hook, ids = tiny_model(), HookPoint(2, "resid"), _contexts()
    d = Mean(32, 32)
    d.b_dec.data = read_rows(model, [hook], ids, [0])[hook.name].mean(0)
    m = heldout_metrics(model, d, hook, ids, [0], batch_size=4, progress=False)
    assert m["ce_spliced"] == pytest.approx(m["ce_mean_ablation"], rel=1e-6)
    assert m["fvu"] == pytest.approx(1.0, rel=1e-4)


def test_all_zero_inputs_leave_cosine_and_l2_ratio_alone():
    """A toy sample where nothing fires is all zeros: it has no angle or length ratio, so it is left out of both
    averages (it used to put ||x_hat|| / 1e-12 into the l2_ratio mean)."""
    from sae.evaluation.metrics import reconstruction_metrics

    x = torch.randn(8, 16)
    x[3] = 0.0
    m = reconstruction_metrics(Half(16, 16), x)
    assert m["l2_ratio"] == pytest.approx(0.5, abs=1e-6) and m["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_zero_and_mean_ablation_kl_are_those_of_the_spliced_runs():
    """``kl_zero_ablation``/``kl_mean_ablation`` are KL(clean || ablated): a dictionary that reconstructs zeros
    (the held-out mean) splices in exactly the zero- (mean-) ablated run."""
    from sae.lm.reader import read_rows

    model, hook, ids = tiny_model(), HookPoint(1, "resid"), _contexts()
    zero = heldout_metrics(model, Zero(32, 32), hook, ids, [0], batch_size=4, progress=False)
    assert zero["kl_zero_ablation"] > 1e-4 and zero["kl_spliced"] == pytest.approx(zero["kl_zero_ablation"], rel=1e-6)
    d = Mean(32, 32)
    d.b_dec.data = read_rows(model, [hook], ids, [0])[hook.name].mean(0)
    mean = heldout_metrics(model, d, hook, ids, [0], batch_size=4, progress=False)
    assert mean["kl_mean_ablation"] == pytest.approx(mean["kl_spliced"], rel=1e-5)
    assert mean["kl_mean_ablation"] != pytest.approx(mean["kl_zero_ablation"], rel=1e-2)


def _peaked_model():
    """The tiny model with its unembedding scaled up: confident, distinct next-token distributions (a random tiny
    model's are near uniform, where any CE or KL looks alike)."""
    model = tiny_model()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def test_chunked_losses_equal_the_full_logits(monkeypatch):
    """CE, KL and the zero/mean-ablation CE and KL from the final hidden states, a chunk of positions at a time
    (7 positions a chunk: 15 predictions per context, so chunk boundaries fall inside contexts), equal the
    full-logits computation, for several dictionaries sharing the clean run's chunks; the head never runs on the
    chunked path (no ``[positions, vocabulary]`` logits are formed)."""
    import sae.evaluation.metrics as metrics
    from sae.dictionaries import build
    from sae.evaluation.heldout import heldout_metrics_many

    model, hook, ids = _peaked_model(), HookPoint(1, "resid"), _contexts()
    torch.manual_seed(0)
    dictionaries = {f"topk{k}": build("topk", 32, 64, k=k, aux_coeff=0.0, k_aux=None) for k in (2, 8)}
    full = heldout_metrics_many(model, dictionaries, hook, ids, [0], batch_size=4, progress=False, from_states=False)
    monkeypatch.setitem(metrics.ROWS_PER_CHUNK_ELEMENTS, "cpu", 7 * model.config.vocab_size)

    def no_full_logits(module, inputs, output):
        raise AssertionError("the head ran: full logits were formed")

    handle = model.get_output_embeddings().register_forward_hook(no_full_logits)
    import sae.lm.splice as splice

    splice._UNEMBEDDINGS[model] = (model.get_output_embeddings().weight, None)  # found before the hook, as in use
    chunked = heldout_metrics_many(model, dictionaries, hook, ids, [0], batch_size=4, progress=False)
    handle.remove()
    keys = ["ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "kl_spliced", "kl_zero_ablation",
            "kl_mean_ablation", "ce_loss_recovered"]
    for name in dictionaries:
        assert full[name]["kl_spliced"] > 0.05 and full[name]["kl_zero_ablation"] > 0.05  # the values can differ
        for key in keys:
            assert chunked[name][key] == pytest.approx(full[name][key], rel=1e-5, abs=1e-7), (name, key)
    assert full["topk2"]["kl_spliced"] != pytest.approx(full["topk8"]["kl_spliced"], rel=1e-3)


@pytest.mark.parametrize("variant", ["topk", "relu"])
def test_the_held_out_metrics_sparse_decode_is_decode(variant):
    """``Tally`` decodes through ``decode_sparse`` (a sparse product over the firing codes): ``decode``'s values."""
    from conftest import TEST_HPARAMS

    from sae.dictionaries import build

    torch.manual_seed(0)
    d = build(variant, 32, 256, **{**TEST_HPARAMS[variant], **({"k": 4} if variant == "topk" else {})})
    x = torch.randn(50, 32)
    d.init_from_data(x)
    with torch.no_grad():
        d.b_enc.add_(0.1 * torch.randn_like(d.b_enc))
        codes = d.encode(x)
    assert 0 < (codes != 0).float().mean() < 1
    torch.testing.assert_close(d.decode_sparse(codes), d.decode(codes), rtol=1e-5, atol=1e-5)


def test_the_held_out_sums_are_the_same_when_the_codes_come_in_row_parts(monkeypatch):
    """``Tally`` encodes a batch in parts of at most ``CODE_PART_BYTES`` of codes (bounded memory at any width):
    every sum it reports, SAEBench's included, equals the one-part result."""
    from conftest import TEST_HPARAMS

    from sae.dictionaries import base, build
    from sae.evaluation.metrics import Tally

    torch.manual_seed(0)
    d = build("topk", 16, 64, **{**TEST_HPARAMS["topk"], "k": 4})
    d.init_from_data(torch.randn(200, 16))
    batches = [torch.randn(40, 16), torch.randn(40, 16)]

    def summary() -> dict:
        tally = Tally(d, torch.device("cpu"))
        for x in batches:
            tally.add_reconstruction(x)
        return {**tally.reconstruction_summary(), **tally.saebench.metrics()["sparsity"]}

    whole = summary()
    monkeypatch.setattr(base, "CODE_PART_BYTES", 4 * 64 * 7)  # 7 rows a part: 6 parts of a 40-row batch
    parts = summary()
    assert parts.keys() == whole.keys()
    for key, value in whole.items():
        if isinstance(value, float):
            assert parts[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
