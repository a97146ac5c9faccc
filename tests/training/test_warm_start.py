"""``train.init_from``: a run starts from a saved dictionary (MSE, then KL fine-tuning), records it in sae.json,
and refuses a missing or mismatched one in one line."""

import hashlib
import json

import pytest
import torch
from conftest import run_cli, tiny_overrides
from safetensors.torch import load_file

from sae.evaluation.perplexity import objective_of


@pytest.fixture(scope="module")
def mse_run(tiny_lm_dir, tiny_text, tmp_path_factory):
    """A finished tiny TopK MSE run (the dictionary the others start from)."""
    run_dir = tmp_path_factory.mktemp("mse")
    result = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, run_dir, "sae=topk", "sae.k=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_kl_run_starts_from_the_saved_dictionary_and_records_it(mse_run, tiny_lm_dir, tiny_text, tmp_path):
    # a learning rate so small that the fine-tuned weights are the starting ones (a fresh start is far from them)
    tuned = tmp_path / "tuned"
    result = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tuned, "sae=topk", "sae.k=4"),
                     "objective=kl_mse", f"train.init_from={mse_run}", "train.tokens=256", "train.batch_size=64",
                     "train.lr=1e-12")
    assert result.returncode == 0, result.stderr[-3000:]
    start, got = load_file(str(mse_run / "sae.safetensors")), load_file(str(tuned / "sae.safetensors"))
    for key in start:
        torch.testing.assert_close(got[key], start[key], rtol=0, atol=1e-6, msg=key)
    meta = json.loads((tuned / "sae.json").read_text())
    record = meta["initialised_from"]
    assert record["directory"] == str(mse_run.resolve()) and record["objective"] == "mse"
    assert record["tokens_before"] == 4096 and meta["train"]["init_from"] == str(mse_run)
    assert record["weights_sha256"] == hashlib.sha256((mse_run / "sae.safetensors").read_bytes()).hexdigest()
    assert objective_of(meta) == "mse→kl_mse"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["train.init_from=/nonexistent/run"], "error: train.init_from=/nonexistent/run is not a directory"),
        (
            ["train.init_from={run}", "sae=relu_tied", "hook.layer=2"],
            "error: train.init_from: the dictionary in {run} does not match this run: "
            "variant topk (this run: relu_tied), hook {{'layer': 1, 'site': 'resid'}} "
            "(this run: {{'layer': 2, 'site': 'resid'}})",
        ),
        (
            ["train.init_from={run}", "sae=topk", "sae.ratio=2"],
            "error: train.init_from: the dictionary in {run} does not match this run: n_features 128 (this run: 64)",
        ),
    ],
)
def test_a_missing_or_mismatched_start_is_one_line(extra, message, mse_run, tiny_lm_dir, tiny_text, tmp_path):
    result = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path / "run"),
                     *(e.format(run=mse_run) for e in extra))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0] == message.format(run=mse_run) or lines[0].startswith(message.format(run=mse_run)), lines[0]
    assert not (tmp_path / "run" / "status.json").exists()
