"""sae.lm.shapes: a random-weight GPT-NeoX of a real Pythia's exact shape, written offline."""

from pathlib import Path

import pytest
import torch

from sae.errors import ConfigError
from sae.lm import shapes


def test_pythia_70m_shape_matches_the_published_config():
    cfg = shapes.shape_config("pythia-70m")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (512, 6, 8, 2048)
    assert cfg.vocab_size == 50304 and cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert shapes.shape_config("pythia-410m").hidden_size == 1024


def test_tiny_shape_writes_a_loadable_model(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tiny"
    assert shapes.main(["tiny", str(out), "--seed", "3"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    built = shapes.build("tiny", seed=3)
    ids = torch.tensor([[0, 5, 17, 300]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, built(ids).logits, atol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # no staging directory left behind


def test_bad_input_is_one_line(tmp_path: Path, capsys):
    with pytest.raises(ConfigError, match="unknown shape"):
        shapes.shape_config("pythia-7b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert shapes.main(["tiny", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty" in err and len(err.splitlines()) == 1
