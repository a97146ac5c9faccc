"""SAELens interop: export then load gives the same dictionary; SAELens's own formula is reproduced on import."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, needs_fixtures, write_saelens_dir
from safetensors.torch import load_file

import sae
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


@pytest.mark.parametrize(
    "variant,hparams",
    [
        ("relu_tied", {"l1_coeff": 0.1}),
        ("relu", {"l1_coeff": 0.0}),
        ("topk", {"k": 5, "aux_coeff": 0.0, "k_aux": None}),
    ],
)
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
    w = {
        "W_enc": torch.randn(8, 24, generator=gen),
        "W_dec": 3 * torch.rand(24, 1, generator=gen) * torch.randn(24, 8, generator=gen),
        "b_enc": torch.randn(24, generator=gen),
        "b_dec": torch.randn(8, generator=gen),
    }
    write_saelens_dir(
        tmp_path,
        w,
        {
            "architecture": "standard",
            "d_in": 8,
            "d_sae": 24,
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "model_name": "m",
            "hook_name": "blocks.2.hook_resid_pre",
        },
    )
    loaded, meta = load_saelens(tmp_path)
    x = torch.randn(50, 8, generator=gen)
    by_hand = torch.relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(loaded(x), by_hand, rtol=1e-4, atol=1e-4)
    assert meta["hook"] == {"layer": 1, "site": "resid"}


def test_unsupported_hook_and_normalisation(tmp_path):
    with pytest.raises(ConfigError, match="hook_z"):
        hook_from_name("blocks.0.attn.hook_z")
    write_saelens_dir(
        tmp_path,
        {"W_enc": torch.zeros(2, 3), "W_dec": torch.ones(3, 2), "b_enc": torch.zeros(3), "b_dec": torch.zeros(2)},
        {"normalize_activations": "layer_norm", "hook_name": "blocks.0.hook_resid_post"},
    )
    with pytest.raises(ConfigError, match="layer_norm"):
        load_saelens(tmp_path)


def _fixture(kind: str) -> tuple[dict, dict, dict]:
    """SAELens' own file of ``kind``: its cfg, its weights and the reference codes and reconstructions."""
    directory = FIXTURES / "saelens" / kind
    return (json.loads((directory / "cfg.json").read_text()), load_file(str(directory / "sae_weights.safetensors")),
            load_file(str(FIXTURES / "saelens" / "reference.safetensors")))


def _check_against(directory, w: dict, codes_ref: torch.Tensor, reconstruction_ref: torch.Tensor, x: torch.Tensor,
                   rescaled: bool = False):
    """Our import of ``directory`` gives SAELens' reconstruction to 1e-5 and its codes times each atom's decoder norm
    over the mean norm (the module docstring's rescaling; ``rescaled``: SAELens' codes already carry the norms, so
    ours are theirs over the mean norm), with the same active features."""
    loaded, meta = load_saelens(directory)
    norms = w["W_dec"].norm(dim=1)
    per_atom = 1 / norms.mean() if rescaled else norms / norms.mean()
    with torch.no_grad():
        codes, reconstruction = loaded.encode(x), loaded(x)
    torch.testing.assert_close(codes, codes_ref * per_atom, rtol=0, atol=1e-5)
    torch.testing.assert_close(reconstruction, reconstruction_ref, rtol=0, atol=1e-5)
    assert torch.equal(codes != 0, codes_ref != 0)
    return loaded, meta


@needs_fixtures
@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_saelens_own_files_give_saelens_own_codes_and_reconstructions(kind):
    cfg, w, ref = _fixture(kind)
    loaded, meta = _check_against(
        FIXTURES / "saelens" / kind, w, ref[f"{kind}.codes"], ref[f"{kind}.reconstruction"], ref["input"]
    )
    assert meta["hook"] == {"layer": 3, "site": "resid"} and loaded.variant == (
        "relu" if kind == "standard" else "topk"
    )
    if kind == "topk":
        assert cfg["rescale_acts_by_decoder_norm"] is False and (
            w["W_dec"].norm(dim=1).std() > 0.01
        )  # ranks unequal norms
        assert ((ref["topk.codes"] != 0).sum(-1) == cfg["k"]).all()


@needs_fixtures
def test_imported_ranked_topk_is_refused_by_save(tmp_path):
    """The peer's TopK fixture imports as an inference-only class that ``sae.load`` could not rebuild from its
    variant name: saving it is one ConfigError, and nothing is written."""
    loaded, _ = load_saelens(FIXTURES / "saelens" / "topk")
    assert type(loaded).__name__ == "RankedTopKDictionary"
    with pytest.raises(ConfigError, match="cannot be saved"):
        sae.io.saving.save_dictionary(loaded, tmp_path / "copy", dict(META))
    assert not (tmp_path / "copy").exists()


@needs_fixtures
def test_topk_rescaled_by_decoder_norm(tmp_path):
    """SAELens' TopK with rescale_acts_by_decoder_norm: true ranks and reports pre-activations times the decoder row
    norms and divides them out again to decode (sae_lens/saes/topk_sae.py), written out here by hand."""
    cfg, w, ref = _fixture("topk")
    write_saelens_dir(tmp_path, w, {**cfg, "rescale_acts_by_decoder_norm": True})
    x, norms = ref["input"], w["W_dec"].norm(dim=1)
    hidden = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    values, indices = hidden.topk(cfg["k"], dim=-1)
    codes = torch.zeros_like(hidden).scatter_(-1, indices, values.relu())
    reconstruction = (codes / norms) @ w["W_dec"] + w["b_dec"]
    assert not torch.equal(codes != 0, ref["topk.codes"] != 0)  # the setting changes which features are kept
    _check_against(tmp_path, w, codes, reconstruction, x, rescaled=True)


@needs_fixtures
@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_unfolded_activation_scaling_is_folded_on_import(kind, tmp_path):
    """A cfg still saying normalize_activations: expected_average_only_in holds weights for activations times
    norm_scaling_factor: SAELens' own file, unfolded by that factor, must load to SAELens' own results."""
    cfg, w, ref = _fixture(kind)
    factor = 0.37
    unfolded = {**w, "W_enc": w["W_enc"] / factor, "W_dec": w["W_dec"] * factor, "b_dec": w["b_dec"] * factor}
    write_saelens_dir(tmp_path, unfolded, {**cfg, "normalize_activations": "expected_average_only_in",
                                           "norm_scaling_factor": factor})
    _check_against(tmp_path, w, ref[f"{kind}.codes"], ref[f"{kind}.reconstruction"], ref["input"])
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(
        ConfigError, match=r"expected_average_only_in'.*does not record \(got None\); add \"norm_scaling_factor\""
    ):
        load_saelens(tmp_path)


def test_export_is_whole_or_absent(tmp_path, monkeypatch):
    """A failed export leaves the earlier export untouched and no temporary directory; a foreign directory is
    refused."""
    import sae.io.saelens as saelens

    sae.save_dictionary(_trained_like("relu", l1_coeff=0.0), tmp_path / "run", META)
    sae.save_dictionary(sae.build("relu", 16, 64, l1_coeff=0.0), tmp_path / "other", META)
    saelens.export_saelens(tmp_path / "run", tmp_path / "lens")
    before = {p.name: p.read_bytes() for p in (tmp_path / "lens").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saelens, "write_json", fail)  # the weights are written, the cfg is not
    with pytest.raises(OSError, match="disk full"):
        saelens.export_saelens(tmp_path / "other", tmp_path / "lens")
    assert {p.name: p.read_bytes() for p in (tmp_path / "lens").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens", "other", "run"]
    with pytest.raises(ConfigError, match="is not a SAELens directory of ours"):
        saelens.export_saelens(tmp_path / "run", tmp_path / "run")
