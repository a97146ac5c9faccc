"""The end-to-end objectives: the KL term against a hand computation, a perfect dictionary's zero KL and gradient,
the frozen LM, exact resume after SIGKILL, and the one-line refusals."""

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import ROOT, TEST_HPARAMS, kill_after_checkpoint, run_cli, text_settings, tiny_model, tiny_overrides
from safetensors.torch import load_file

from sae.data.contexts import ContextDataModule
from sae.dictionaries import build
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture
from sae.lm.session import LMSession
from sae.training.module import DictionaryModule
from sae.training.objectives import Objective
from sae.training.spliced import downstream_hooks, spliced_terms

HOOK = HookPoint(1, "resid")
SPECIAL = [0]


def _ids(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(2, 20, (3, 12))
    ids[:, 0] = 0  # BOS
    ids[1, 7] = 0  # a document boundary inside a context
    return ids


def _dictionary(model, ids, variant="relu_tied", n=64):
    d = build(variant, 32, n, **TEST_HPARAMS[variant])
    d.init_from_data(capture(model, [HOOK], ids)[HOOK].flatten(0, 1))
    return d


def _perfect(model, ids):
    """A tied ReLU dictionary with atoms +e_i and -e_i: relu(x - b) - relu(b - x) + b = x exactly."""
    d = _dictionary(model, ids)
    with torch.no_grad():
        eye = torch.eye(32)
        d.W_dec.copy_(torch.cat([eye, -eye]))
        d.b_enc.zero_()
    return d


def test_kl_term_equals_a_hand_computation():
    model = tiny_model().requires_grad_(False)
    ids = _ids()
    d = _dictionary(model, ids)
    (terms,) = spliced_terms(model, ids, SPECIAL, [(HOOK, d)], [[]], "each")
    with torch.no_grad():
        clean = model(input_ids=ids).logits[:, :-1].double()
        x = capture(model, [HOOK], ids)[HOOK]
        keep = (ids != 0).unsqueeze(-1)
        x_spliced = torch.where(keep, d(x), x)

        def replace(module, inputs, output):
            return (x_spliced,) + tuple(output[1:]) if isinstance(output, tuple) else x_spliced

        handle = model.gpt_neox.layers[HOOK.layer].register_forward_hook(replace)
        spliced = model(input_ids=ids).logits[:, :-1].double()
        handle.remove()
    p, log_p, log_q = clean.softmax(-1), clean.log_softmax(-1), spliced.log_softmax(-1)
    want = (p * (log_p - log_q)).sum(-1).mean()  # per next-token prediction, averaged over all of them
    assert want > 1e-4  # a random dictionary changes the predictions
    torch.testing.assert_close(terms.kl.double(), want, rtol=1e-4, atol=1e-7)


def test_a_perfect_dictionary_has_zero_kl_and_zero_gradient():
    model = tiny_model().requires_grad_(False)
    ids = _ids()
    d = _perfect(model, ids)
    (terms,) = spliced_terms(model, ids, SPECIAL, [(HOOK, d)], [downstream_hooks(HOOK, 3)], "each")
    assert abs(terms.kl.item()) < 1e-6 and terms.downstream.item() < 1e-10
    (terms.kl + terms.downstream).backward()
    for name, param in d.named_parameters():
        assert param.grad is not None and param.grad.abs().max() < 1e-6, name
    broken = _dictionary(model, ids)  # the test can fail: an imperfect one has a KL and a gradient
    (terms,) = spliced_terms(model, ids, SPECIAL, [(HOOK, broken)], [[]], "each")
    terms.kl.backward()
    assert terms.kl.item() > 1e-4 and broken.W_dec.grad.abs().max() > 1e-6


def _module(objective: dict, steps: int) -> DictionaryModule:
    dictionary = {"variant": "topk", "d_in": 32, "n_features": 64, **TEST_HPARAMS["topk"]}
    return DictionaryModule(
        dictionaries=[
            {"name": None, "input_key": HOOK.name, "hook": {"layer": 1, "site": "resid"}, "dictionary": dictionary}
        ],
        total_steps=steps,
        lr=3e-3,
        betas=(0.9, 0.999),
        warmup_steps=1,
        lr_decay_frac=0.2,
        sparsity_warmup_frac=0.0,
        dead_window=1000,
        init_tokens=256,
        resample_every=0,
        resample_until=0.5,
        duplicate_cos=0.99,
        resample_pool=0,
        seed=0,
        objective=objective,
    )


@pytest.mark.parametrize("name,splice", [("kl", "each"), ("e2e_ds", "all")])
def test_the_lm_gets_no_gradient_and_no_optimizer_state(name, splice, tiny_lm_dir, tiny_text):
    session = LMSession(str(tiny_lm_dir), text_settings(tiny_text), model_dtype="float32", lm_batch_size=8, seed=0)
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    objective = {"name": name, "splice": splice, "kl_coeff": 1.0, "mse_coeff": 0.5, "downstream_coeff": 1.0}
    module = _module(objective, steps=4)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ContextDataModule(session, [HOOK], 64, 0))
    for k, v in session.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in session.model.parameters())
    optimizer = trainer.optimizers[0]
    lm_params = {id(p) for p in session.model.parameters()}
    assert optimizer.state and not any(id(p) in lm_params for p in optimizer.state)
    assert not any(k.startswith("gpt_neox") for k in module.state_dict())  # the LM is not in checkpoints
    assert not torch.equal(module.state_dict()["members.0.dictionary.W_dec"], start["members.0.dictionary.W_dec"])


def kl_overrides(lm_dir, text, run_dir, *extra):
    return tiny_overrides(lm_dir, text, run_dir, "objective=kl_mse", "train.tokens=5120", "train.batch_size=64",
                          "trainer.checkpoint_every_n_steps=7", "sae=topk", "sae.k=4", *extra)


def test_killed_kl_run_resumes_to_the_same_dictionary(tiny_lm_dir, tiny_text, tmp_path):
    whole = run_cli("train.py", *kl_overrides(tiny_lm_dir, tiny_text, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    meta = json.loads((tmp_path / "whole" / "sae.json").read_text())
    assert meta["train"]["objective"]["name"] == "kl_mse" and "kl(clean || spliced)" in meta["loss"].lower()
    killed = tmp_path / "killed"
    kill_after_checkpoint(kl_overrides(tiny_lm_dir, tiny_text, killed), killed)
    assert not (killed / "sae.safetensors").exists()
    resumed = run_cli("train.py", *kl_overrides(tiny_lm_dir, tiny_text, killed), "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = load_file(str(tmp_path / "whole" / "sae.safetensors")), load_file(str(killed / "sae.safetensors"))
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), k
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["kl_spliced"] >= 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["objective=kl", "stream.cache_dir=cache"],
            "error: objective=kl runs the LM in every step, so the activation cache does not apply",
        ),
        (
            ["objective=e2e_ds", "hook.layer=2"],
            "error: objective=e2e_ds compares the block outputs after the hook, but layers.2.resid has none",
        ),
        (["objective=kl", "objective.splice=some"], "error: objective.splice='some' must be one of each, all"),
        (["objective=kl", "objective.kl_coeff=abc"], "error: "),
        (["objective=kl_mse", "train.resample_every=5"], "error: objective=kl_mse does not resample atoms yet"),
    ],
)
def test_bad_objective_settings_are_one_line(extra, message, tiny_lm_dir, tiny_text, tmp_path):
    result = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path / "run"), *extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(message), lines[0]
    assert not (tmp_path / "run" / "sae.safetensors").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_objective_yamls_match_the_schema():
    from omegaconf import OmegaConf

    for name in ("mse", "kl", "kl_mse", "e2e_ds"):
        cfg = OmegaConf.load(ROOT / "conf" / "objective" / f"{name}.yaml")
        objective = Objective.from_config(cfg)
        assert objective.name == name and objective.problems() == []


def test_the_kl_gradient_written_out_equals_autograds():
    from sae.evaluation.metrics import NextTokenScorer

    torch.manual_seed(0)
    z, clean, ids = torch.randn(2, 7, 30, requires_grad=True), torch.randn(2, 7, 30), torch.randint(0, 30, (2, 7))
    scorer = NextTokenScorer(clean, ids)
    weights = torch.rand(2, 6)
    (written,) = torch.autograd.grad((scorer.kl_per_token(z) * weights).sum(), z)
    zs = z[:, :-1]
    (auto,) = torch.autograd.grad((scorer._kl(zs, torch.logsumexp(zs, -1)) * weights).sum(), z)
    torch.testing.assert_close(written, auto, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(scorer.kl_per_token(z), scorer._kl(zs, torch.logsumexp(zs, -1)))


@pytest.mark.parametrize("bias", [False, True])
def test_the_kl_from_hidden_states_equals_the_kl_of_the_logits(bias, monkeypatch):
    """``kl_from_hidden`` (chunked, gradient formed in the forward) is ``NextTokenScorer.kl_per_token`` of the
    logits, value and gradient, over several chunks and a short last one."""
    import sae.evaluation.metrics as metrics

    monkeypatch.setitem(metrics.ROWS_PER_CHUNK_ELEMENTS, "cpu", 3 * 40)  # 3 rows a chunk: 13 predictions, 5 chunks
    torch.manual_seed(0)
    weight, b = torch.randn(40, 8), (torch.randn(40) if bias else None)
    clean = torch.randn(1, 14, 8)
    hidden = (clean + 0.3 * torch.randn_like(clean)).requires_grad_()
    weights = torch.rand(1, 13)
    got = metrics.kl_from_hidden(hidden, clean, weight, b)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), hidden)
    ids = torch.randint(0, 40, (1, 14))
    want = metrics.NextTokenScorer(F.linear(clean, weight, b), ids).kl_per_token(F.linear(hidden, weight, b))
    (want_grad,) = torch.autograd.grad((want * weights).sum(), hidden)
    assert want.min() > 1e-3  # the test can fail: every prediction moved
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)  # float32 logits either way


def test_spliced_terms_take_the_logits_path_when_the_head_is_not_a_plain_linear_map():
    """A head that scales its logits (as soft-capped heads do) is detected and run as the model runs it: the KL is
    then the logits', and on a plain head both paths agree."""
    import sae.training.spliced as spliced

    model = tiny_model().requires_grad_(False)
    ids = _ids()
    d = _dictionary(model, ids)
    (fast,) = spliced_terms(model, ids, SPECIAL, [(HOOK, d)], [[]], "each")
    assert spliced.linear_unembedding(model) is not None
    (slow,) = spliced_terms(model, ids, SPECIAL, [(HOOK, d)], [[]], "each", from_states=False)
    torch.testing.assert_close(fast.kl, slow.kl, rtol=1e-5, atol=1e-7)
    scaled = tiny_model().requires_grad_(False)
    scaled.get_output_embeddings().register_forward_hook(lambda module, inputs, out: 0.5 * out)
    assert spliced.linear_unembedding(scaled) is None
