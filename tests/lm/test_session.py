"""The LM session: the model loaded once, contexts and special ids, and the one reader."""

import pytest
import torch
from conftest import text_settings

from sae.errors import ConfigError
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture, token_mask
from sae.lm.session import LMSession, TextSettings

HOOKS = [HookPoint(0, "resid"), HookPoint(1, "mlp")]


def test_session_reads_masked_rows_and_loads_the_model_once(tiny_lm_dir, tiny_text, monkeypatch):
    import sae.lm.session as module

    loads = []
    real = module.load_model
    monkeypatch.setattr(module, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    session = LMSession(str(tiny_lm_dir), text_settings(tiny_text), model_dtype="float32", lm_batch_size=3, seed=0)
    contexts = session.train_contexts[:5]
    rows = session.read(HOOKS, contexts)
    raw = capture(session.model, HOOKS, contexts)
    keep = token_mask(contexts, session.special_ids)
    for hook in HOOKS:
        assert torch.equal(rows[hook.name], raw[hook][keep].float())
    session.read(HOOKS, contexts)
    assert len(loads) == 1 and session.special_ids == [0]
    assert session.train_contexts.shape[1] == 32 and (session.train_contexts[:, 0] == 0).all()
    assert len(session.eval_contexts(100)) == 4  # ceil(100 / 32)


def test_sample_is_seeded_and_independent_of_the_batch_size(tiny_lm_dir, tiny_text):
    a = LMSession(str(tiny_lm_dir), text_settings(tiny_text), model_dtype="float32", lm_batch_size=2, seed=5).sample(
        HOOKS, 100
    )
    b = LMSession(str(tiny_lm_dir), text_settings(tiny_text), model_dtype="float32", lm_batch_size=7, seed=5).sample(
        HOOKS, 100
    )
    c = LMSession(str(tiny_lm_dir), text_settings(tiny_text), model_dtype="float32", lm_batch_size=2, seed=6).sample(
        HOOKS, 100
    )
    assert all(torch.equal(a[k], b[k]) for k in a) and a["layers.0.resid"].shape == (100, 32)
    assert not torch.equal(a["layers.0.resid"], c["layers.0.resid"])


def test_incomplete_text_settings_are_one_line():
    with pytest.raises(ConfigError, match="lack text_column, split"):
        TextSettings.from_record({"source": "files", "path": "x", "context_length": 8, "heldout_fraction": 0.1})
