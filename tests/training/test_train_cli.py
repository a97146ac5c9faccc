"""train.py as a user runs it: outputs, multirun, checkpoints, loggers and every bad input."""

import json

import pytest
import torch
from conftest import FIXTURES, needs_fixtures, run_cli, tiny_overrides
from safetensors.torch import load_file

import sae

METRICS = {
    "mse",
    "fvu",
    "l0",
    "dead_frac",
    "ce_clean",
    "ce_spliced",
    "ce_zero_ablation",
    "ce_loss_recovered",
    "n_tokens",
}


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, tiny_text, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_outputs(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert METRICS <= set(metrics) and metrics["n_tokens"] > 0
    meta = json.loads((trained / "sae.json").read_text())
    assert meta["variant"] == "relu_tied" and meta["hook"] == {"layer": 1, "site": "resid"}
    assert meta["n_features"] == 4 * 32 and "l1_coeff" in meta["loss"] and meta["normalisation"]["scale"] > 0
    d = sae.load(trained)
    x = torch.randn(2, 7, 32)
    assert d.decode(d.encode(x)).shape == x.shape
    assert (trained / "csv" / "metrics.csv").is_file()


def test_checkpoint_round_trips(trained):
    from sae.training.module import DictionaryModule

    module = DictionaryModule.load_from_checkpoint(trained / "checkpoints" / "last.ckpt", map_location="cpu")
    saved = load_file(str(trained / "sae.safetensors"))
    (dictionary,) = module.dictionaries()
    for k, v in dictionary.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert bool(module.initialised)


def test_multirun_writes_two_dictionaries(tiny_lm_dir, tiny_text, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_lm_dir, tiny_text, tmp_path) if not o.startswith("hydra.run")]
    proc = run_cli("train.py", "-m", *overrides, "hook.layer=0,2", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers = sorted(sae.io.saving.read_meta(tmp_path / "sweep" / str(i))["hook"]["layer"] for i in range(2))
    assert layers == [0, 2]
    for i in range(2):
        assert sae.load(tmp_path / "sweep" / str(i)).n_features == 128


def test_wandb_offline(tiny_lm_dir, tiny_text, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_lm_dir, tiny_text, tmp_path) if o != "logger=csv"]
    proc = run_cli("train.py", *overrides, "logger=wandb", "sae=topk", "sae.k=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert json.loads((tmp_path / "metrics.json").read_text())["l0"] == 8  # every input keeps exactly its k codes


BAD = [
    (["hook.layer=7"], "hook.layer=7 does not exist"),
    (["hook.site=mlp_in"], "unknown hook.site 'mlp_in'"),
    (["sae.ratio=0"], "sae.ratio=0 must be > 0"),
    (["sae.l1_coeff=-1"], "sae.l1_coeff=-1 must be >= 0"),
    (["data.path=/nonexistent/*.jsonl"], "matches no file"),
    (["data.text_column=body"], "no 'body' field"),
    (["model.name_or_path=EleutherAI/no-such-model"], "cannot load model"),
    (["model.name_or_path=/nonexistent/model"], "does not exist"),
    (
        ["sae.ratio=0", "train.lr=0", "trainer.devices=3"],
        "activation width); train.lr=0.0 must be > 0; train.batch_size (128) must be divisible by the 3 processes",
    ),
]


@pytest.mark.parametrize("extra,message", BAD, ids=["+".join(o.split("=")[0] for o in b[0]) for b in BAD])
def test_bad_input(tiny_lm_dir, tiny_text, tmp_path, extra, message):
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), *extra)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "metrics.json").exists()


def test_empty_text_file(tiny_lm_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, empty, tmp_path))
    assert proc.returncode != 0 and "holds no text" in proc.stderr and proc.stderr.count("\n") == 1


def test_default_command_fails_offline_with_the_offline_command(tmp_path):
    proc = run_cli("train.py", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "cannot load model 'EleutherAI/pythia-70m-deduped'" in proc.stderr
    assert (
        "the README's offline command" in proc.stderr and "../shared" not in proc.stderr
    )  # no fixture path in library messages


@needs_fixtures
def test_real_model_short_run(tmp_path):
    """A short run on the stand-in LM reaches the figures of docs/results/offline.md for this command
    (150,000 tokens: FVU 0.146, CE difference 0.066, CE loss recovered 0.995), within a stated margin: 20% on FVU, 50%
    on the small CE difference, 0.005 on CE loss recovered (the run is deterministic on one machine; another CPU or BLAS
    rounds differently). The bounds this replaced (FVU < 0.5, CE recovered > 0.9) held for a dictionary 3× worse."""
    proc = run_cli(
        "train.py", f"model.name_or_path={FIXTURES / 'neox-owt-14m'}", "data=text_files",
        f"data.path={FIXTURES / 'text' / 'openwebtext-1k.jsonl'}", "train.tokens=150000", "data.eval_tokens=4096",
        "stream.buffer_size=16384", "train.init_tokens=8192", "logger=csv", f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["fvu"] <= 1.2 * 0.146, m
    assert m["ce_spliced"] - m["ce_clean"] <= 1.5 * 0.066, m
    assert m["ce_loss_recovered"] >= 0.995 - 0.005, m
