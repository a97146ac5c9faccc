"""Bad input found before any work: one line naming the problem and the way out, exit status 2, nothing written."""

import json

import pytest
import torch
from conftest import compose_config, run_cli, tiny_overrides

from sae.errors import ConfigError
from sae.io.saelens import load_saelens
from sae.io.saving import read_meta
from sae.training.validation import validate


def _one_line(proc, *expected: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: ") and all(e in lines[-1] for e in expected), lines[-1]
    return lines[-1]


def test_evaluating_a_toy_run_is_one_line(tmp_path):
    toy = ["experiment=toy", "data.n_features=16", "data.d=8", "data.avg_active=2", "train.tokens=2560",
           "train.batch_size=256", "data.eval_tokens=256", "train.init_tokens=256", "logger=csv"]
    assert run_cli("train.py", *toy, f"hydra.run.dir={tmp_path}/sweep/toy").returncode == 0
    _one_line(run_cli("evaluate.py", f"run={tmp_path}/sweep/toy"), "trained on toy data", "metrics.json")
    _one_line(run_cli("evaluate.py", f"run={tmp_path}/sweep"), "toy: trained on toy data")  # a sweep holding one
    assert not (tmp_path / "sweep" / "eval").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_accelerator_without_a_gpu_is_refused_before_the_run_starts(tiny_lm_dir, tiny_text, tmp_path):
    _one_line(run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path / "run"), "trainer.accelerator=gpu"),
              "trainer.accelerator=gpu but this machine has no CUDA device")
    assert not (tmp_path / "run" / "status.json").exists()  # the directory may be used again at once


def test_context_longer_than_the_model_and_a_dictionary_without_atoms(tiny_lm_dir, tiny_text, tmp_path):
    overrides = tiny_overrides(tiny_lm_dir, tiny_text, tmp_path)
    with pytest.raises(ConfigError, match=r"data.context_length=4096 is longer than the model's 128 positions"):
        validate(compose_config([*overrides, "data.context_length=4096"]))
    with pytest.raises(ConfigError, match=r"sae.ratio=0.01 gives 0 atoms for width 32"):
        validate(compose_config([*overrides, "sae.ratio=0.01"]))


def test_text_problems_are_found_before_the_run_is_marked_running(tiny_lm_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    _one_line(run_cli("train.py", *tiny_overrides(tiny_lm_dir, empty, tmp_path / "run")), "holds no text")
    assert not (tmp_path / "run" / "status.json").exists()


def test_corrupt_files_are_one_line(tmp_path):
    (tmp_path / "sae.json").write_text('{"variant": "relu", ')
    with pytest.raises(ConfigError, match="sae.json is not valid JSON"):
        read_meta(tmp_path)
    lens = tmp_path / "lens"
    lens.mkdir()
    (lens / "cfg.json").write_text("not json")
    (lens / "sae_weights.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="cfg.json is not valid JSON"):
        load_saelens(lens)
    (lens / "cfg.json").write_text(json.dumps({"architecture": "standard", "hook_name": "blocks.0.hook_resid_post"}))
    with pytest.raises(ConfigError, match="sae_weights.safetensors cannot be read"):
        load_saelens(lens)
    from safetensors.torch import save_file

    save_file(
        {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "b_dec": torch.zeros(4)},
        str(lens / "sae_weights.safetensors"),
    )
    with pytest.raises(ConfigError, match="lacks W_dec"):
        load_saelens(lens)
