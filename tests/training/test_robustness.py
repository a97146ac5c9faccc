"""Runs that end cleanly: NaN stop, status file, atomic checkpoints, sweeps through other Hydra launchers."""

import json

import pytest
import torch
from conftest import run_cli, tiny_overrides

import sae
from sae.io.checkpoints import AtomicCheckpointIO


def test_absurd_learning_rate_stops_with_one_line(tiny_lm_dir, tiny_text, tmp_path):
    proc = run_cli(
        "train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), "train.lr=1e30", "train.warmup_steps=1"
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]  # after the training progress output
    assert last.startswith("error: the loss became") and "at step" in last and "train.lr" in last
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "sae.json").exists()
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


def test_finished_run_says_so(tiny_lm_dir, tiny_text, tmp_path):
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"
    assert not list(tmp_path.rglob("*.tmp"))
    again = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path))  # the same directory again
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, again.stderr[-2000:]
    assert "already holds a run (status: finished): add resume=true" in lines[0]


def test_atomic_checkpoint_leaves_old_file_when_write_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.ones(2)}, path)
    with pytest.raises(AttributeError, match="Can.t pickle local object"):  # what pickle says of a lambda
        io.save_checkpoint({"a": lambda: None}, path)  # cannot be pickled: the write fails midway
    assert torch.load(path)["a"].sum() == 2 and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt",
        "last.ckpt.sha256",
    ]


@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_multirun_through_other_launchers(tiny_lm_dir, tiny_text, tmp_path, launcher):
    overrides = [o for o in tiny_overrides(tiny_lm_dir, tiny_text, tmp_path) if not o.startswith("hydra.run")]
    proc = run_cli("train.py", "-m", f"hydra/launcher={launcher}", *overrides, "hook.layer=0,2",
                   f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers = sorted(sae.io.saving.read_meta(tmp_path / "sweep" / str(i))["hook"]["layer"] for i in range(2))
    assert layers == [0, 2]
