"""Training on GPUs: the resampling pool follows the module between devices, a run resumed on a GPU resamples from
its restored pool, and (two GPUs) a DDP run gathers the pools through NCCL at its final save. The ``cuda`` tests
skip, saying so, without a CUDA device; the first test runs anywhere (the move between dtypes takes the same path)."""

import json

import torch
from conftest import kill_after_checkpoint, needs_cuda, needs_gpus, run_cli, tiny_overrides
from safetensors.torch import load_file

from sae.training.module import TrainedDictionary

CFG = {"variant": "relu", "d_in": 8, "n_features": 32, "l1_coeff": 0.0}


def test_the_pool_moves_with_the_module():
    member = TrainedDictionary(None, "toy", CFG, seed=0, dead_window=10, resample_pool=64)
    member.remember(torch.randn(64, 8))
    member.double()
    assert member.recent_inputs.dtype == torch.float64 and member.dictionary.b_dec.dtype == torch.float64
    state = member.pool_state()
    assert state["inputs"].shape == (1, 64, 8) and state["inputs"].device.type == "cpu"


@needs_cuda
def test_a_pool_restored_on_the_cpu_resamples_on_the_gpu():
    member = TrainedDictionary(None, "toy", CFG, seed=0, dead_window=10, resample_pool=64)
    member.remember(torch.randn(64, 8))
    state = member.pool_state()
    fresh = TrainedDictionary(None, "toy", CFG, seed=0, dead_window=10, resample_pool=64)
    fresh.load_pool_state(state, 0)  # as Lightning restores a checkpoint: before the module is moved
    fresh.cuda()
    assert fresh.recent_inputs.is_cuda and torch.equal(fresh.recent_inputs.cpu(), member.recent_inputs)
    fresh.tokens_since_fired[:8] = 100
    opt = torch.optim.Adam(fresh.dictionary.parameters(), lr=1e-3, fused=True)
    assert fresh.resample(fresh.resampling_inputs({}), opt, 0.99) > 0
    assert fresh.pool_state()["inputs"].device.type == "cpu"


@needs_cuda
def test_a_run_resumed_on_the_gpu_resamples_and_finishes(tiny_lm_dir, tiny_text, tmp_path):
    """Checkpoints every 10 steps, resampling every 10: the resumed run resamples first thing, from the pool it
    restored (which used to stay on the CPU)."""
    overrides = tiny_overrides(tiny_lm_dir, tiny_text, tmp_path, "train.tokens=10240", "trainer.accelerator=gpu",
                               "trainer.checkpoint_every_n_steps=10", "sae=relu", "train.resample_every=10",
                               "train.dead_window=256")
    kill_after_checkpoint(overrides, tmp_path, step=10)
    resumed = run_cli("train.py", *overrides, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "sae.safetensors")).values())


@needs_gpus(2)
def test_ddp_on_two_gpus_saves_and_finishes(tmp_path):
    """Two GPU processes (NCCL) with resampling: the final checkpoint gathers both pools after Lightning moved the
    module to the CPU (it used to crash there)."""
    from tests.training.test_ddp import TOY

    toy = [o for o in TOY if not o.startswith(("trainer.accelerator", "train.resample_until"))]
    done = run_cli(
        "train.py",
        *toy,
        "trainer.accelerator=gpu",
        "train.resample_until=1.0",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"
    pools = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["resample_pools"]
    assert pools[0]["inputs"].shape[0] == 2
