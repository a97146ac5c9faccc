"""SAELens interop: export then load gives the same dictionary; SAELens's own formula is reproduced on import."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import sae
from conftest import ROOT
from sae.errors import ConfigError
from sae.io.saelens import hook_from_name, is_saelens_dir, load_saelens

META = {
    "model": {"name_or_path": "tiny", "dtype": "float32"},
    "hook": {"layer": 1, "site": "mlp"},
    "data": {"path": "docs.jsonl", "context_length": 32},
}


def _trained_like(variant: str, **hparams) -> sae.Dictionary:
    torch.manual_seed(0)
    d = sae.build(variant, 16, 64, **hparams)
    d.init_from_data(7.0 + 3.0 * torch.randn(256, 16))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return d


@pytest.mark.parametrize("variant,hparams", [("relu_tied", {"l1_coeff": 0.1}), ("relu", {"l1_coeff": 0.0}), ("topk", {"k": 5, "aux_coeff": 0.0, "k_aux": None})])
def test_export_then_load_round_trips(variant, hparams, tmp_path):
    d = _trained_like(variant, **hparams)
    sae.save_dictionary(d, tmp_path / "run", META)
    proc = subprocess.run([sys.executable, "-m", "sae.io.saelens", str(tmp_path / "run"), str(tmp_path / "lens")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert is_saelens_dir(tmp_path / "lens")
    loaded, meta = load_saelens(tmp_path / "lens")
    x = 7.0 + 3.0 * torch.randn(100, 16)
    torch.testing.assert_close(loaded.encode(x), d.encode(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded(x), d(x), rtol=1e-4, atol=1e-4)
    assert meta["hook"] == META["hook"] and meta["model"]["name_or_path"] == "tiny"
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.1.mlp.hook_post" and cfg["d_sae"] == 64


def test_saelens_formula_without_b_dec_on_input(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(8, 24, generator=gen), "W_dec": 3 * torch.rand(24, 1, generator=gen) * torch.randn(24, 8, generator=gen),
         "b_enc": torch.randn(24, generator=gen), "b_dec": torch.randn(8, generator=gen)}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 24, "apply_b_dec_to_input": False,
           "normalize_activations": "none", "model_name": "m", "hook_name": "blocks.2.hook_resid_pre"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded, meta = load_saelens(tmp_path)
    x = torch.randn(50, 8, generator=gen)
    by_hand = torch.relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(loaded(x), by_hand, rtol=1e-4, atol=1e-4)
    assert meta["hook"] == {"layer": 1, "site": "resid"}


def test_unsupported_hook_and_normalisation(tmp_path):
    with pytest.raises(ConfigError, match="hook_z"):
        hook_from_name("blocks.0.attn.hook_z")
    save_file({"W_enc": torch.zeros(2, 3), "W_dec": torch.ones(3, 2), "b_enc": torch.zeros(3), "b_dec": torch.zeros(2)},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"normalize_activations": "layer_norm", "hook_name": "blocks.0.hook_resid_post"}))
    with pytest.raises(ConfigError, match="layer_norm"):
        load_saelens(tmp_path)
