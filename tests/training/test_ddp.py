"""One dictionary trained by two CPU processes (Lightning DDP over gloo) matches one process on the same data."""

import csv
import json

import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sae.errors import ConfigError
from sae.training.run import RunInfo, check_launch
from sae.training.validation import n_processes

# 60 steps of batch 256 on small toy data, with a strong L1 penalty and a short dead window so that atoms die and
# are resampled (from step 20): the firing statistics and the resampling (drawn from the pools of recent inputs
# gathered from both processes) must agree across processes.
TOY = [
    "experiment=toy", "data.n_features=32", "data.d=16", "data.avg_active=3", "data.eval_tokens=512", "sae.ratio=4",
    "train.tokens=15360", "train.init_tokens=512", "train.warmup_steps=5", "train.lr=0.01", "sae.l1_coeff=10",
    "train.dead_window=1024", "train.resample_every=20", "train.resample_until=0.9", "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1", "logger=csv",
]


def _final_state(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_two_processes_match_one(tmp_path):
    ddp = run_cli("train.py", *TOY, "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'ddp'}",
                  env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "Starting with 2 processes" in ddp.stdout + ddp.stderr
    one = run_cli("train.py", *TOY, f"hydra.run.dir={tmp_path / 'one'}", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]

    ddp_state, one_state = _final_state(tmp_path / "ddp"), _final_state(tmp_path / "one")
    assert len(ddp_state["ToyDataModule"]["ranks"]) == 2  # each process's stream position, for resuming
    since_ddp, since_one = (
        ddp_state["state_dict"]["members.0.tokens_since_fired"],
        one_state["state_dict"]["members.0.tokens_since_fired"],
    )
    assert torch.equal(since_ddp, since_one)  # counted over both processes' halves of each batch
    dead = since_one >= 1024
    assert 0 < dead.sum() < len(dead)
    first_resample = []
    for run in ("ddp", "one"):
        rows = list(csv.DictReader(open(tmp_path / run / "csv" / "metrics.csv")))
        first_resample.append(
            next((r["step"], r["train/resampled"]) for r in rows if float(r["train/resampled"] or 0) > 0)
        )
    assert first_resample[0] == first_resample[1] and first_resample[0][0] == "20"
    want, got = (
        load_file(str(tmp_path / "one" / "sae.safetensors")),
        load_file(str(tmp_path / "ddp" / "sae.safetensors")),
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "ddp" / "status.json").read_text())["state"] == "finished"


def test_processes_counted_and_refused_inside_a_local_sweep(tmp_path):
    counts = {1: 1, 2: 2, "3": 3, "0,1": 2, "auto": None, -1: None}
    for devices, want in counts.items():
        assert n_processes(OmegaConf.create({"devices": devices, "num_nodes": 1})) == want
    cfg = OmegaConf.create({"trainer": {"devices": 2, "num_nodes": 1}})
    check_launch(cfg, RunInfo(tmp_path, "run", None))  # a single run may use several processes
    with pytest.raises(ConfigError, match="cannot run inside a sweep on one machine"):
        check_launch(cfg, RunInfo(tmp_path, "job", "sweep", sweep=True))

