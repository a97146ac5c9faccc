"""Divergence: recorded on the device, read every few steps, the same verdict on every process; a step with
non-finite gradients never reaches the weights; a run that diverges without a NaN stops like one that has a NaN."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import run_cli, tiny_overrides

from sae.training.divergence import FVU_HIGH, NON_FINITE, DivergenceWatch, skip_non_finite_step


def test_watch_records_the_first_divergence_of_each_member():
    watch = DivergenceWatch(2, fvu_limit=10.0, window=3)
    fine = torch.tensor([1.0, 1.0])
    for step in range(4):
        watch.observe(step, fine, torch.tensor([0.5, 50.0 if step != 1 else 5.0]))  # member 1: high, but not 3 in a row
    assert watch.earliest() is None
    for step in range(4, 7):
        watch.observe(step, fine, torch.tensor([0.5, 50.0]))
    found = watch.earliest()
    assert (found.member, found.step, found.reason, found.value) == (1, 4, FVU_HIGH, 50.0)
    watch.observe(7, torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 50.0]))
    watch.observe(8, torch.tensor([float("inf"), 1.0]), torch.tensor([0.5, 50.0]))
    assert watch.earliest().step == 4  # the earliest of all, and each member's first record is kept
    assert watch.first_step.tolist() == [7, 4] and watch.reason.tolist() == [NON_FINITE, FVU_HIGH]
    assert torch.isnan(watch.value[0])


def test_a_step_with_non_finite_gradients_is_skipped():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.Adam(params, lr=0.1, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    skip_non_finite_step(opt, params)
    opt.step()
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    params[1].grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    params[0].grad = torch.ones_like(params[0])
    skip_non_finite_step(opt, params)
    opt.step()
    for p, b, m in zip(params, before, moments):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["exp_avg"], m)
        assert opt.state[p]["step"].item() == 1
    for p in params:
        p.grad = torch.ones_like(p)
    skip_non_finite_step(opt, params)
    opt.step()  # finite again: the step is taken
    assert not torch.equal(params[0].detach(), before[0]) and opt.state[params[0]]["step"].item() == 2


def test_finite_divergence_stops_the_run_like_a_nan(tiny_lm_dir, tiny_text, tmp_path):
    """lr=1000 blows the reconstruction up without a NaN: the run must stop with one line, exit 2, and leave no
    dictionary, no metrics and a failed status (before the fix it exited 0 with a complete-looking metrics.json)."""
    proc = run_cli(
        "train.py",
        *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path),
        "train.lr=1000",
        "train.warmup_steps=1",
        "train.divergence_steps=5",
        "trainer.log_every_n_steps=4",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the training diverged at step ") and "train.lr=1000" in last, last
    assert "FVU stayed above 100" in last
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "sae.json").exists()


def _two_ranks(rank: int, init_file: str, results) -> None:
    """One of two gloo processes: rank 1 alone sees a NaN at step 3; both must read the same verdict. Then a
    resampling: only rank 0 plans it, every rank ends with rank 0's weights."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from sae.training.module import TrainedDictionary

        watch = DivergenceWatch(1, fvu_limit=100.0, window=10)
        for step in range(6):
            loss = float("nan") if (rank == 1 and step == 3) else 1.0
            watch.observe(step, torch.tensor([loss]), torch.tensor([0.5]))
        found = watch.earliest()

        cfg = {"variant": "relu", "d_in": 8, "n_features": 32, "l1_coeff": 0.0}
        member = TrainedDictionary(None, "toy", cfg, seed=0, dead_window=10, resample_pool=64)
        torch.manual_seed(rank)  # each process's own inputs, and rank 1's generator differs: only rank 0's counts
        member.generator.manual_seed(100 + rank)
        member.remember(torch.randn(64, 8))
        member.tokens_since_fired[:8] = 100  # 8 dead atoms
        opt = torch.optim.Adam(member.dictionary.parameters(), lr=1e-3, fused=True)
        count = member.resample(member.recent_inputs, opt, 0.99, batch_rows=16)
        pool = member.pool_state()["inputs"]
        results[rank] = (
            found,
            count,
            member.dictionary.W_dec.detach().clone(),
            member.dictionary.b_enc.detach().clone(),
            tuple(pool.shape),
            member.tokens_since_fired[:8].tolist(),
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_share_the_verdict_and_rank_zeros_resampling(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_ranks, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        (found0, count0, w0, b0, pool0, since0), (found1, count1, w1, b1, pool1, since1) = results[0], results[1]
    assert (
        (found0.member, found0.step, found0.reason) == (found1.member, found1.step, found1.reason) == (0, 3, NON_FINITE)
    )
    assert count0 == count1 > 0
    assert torch.equal(w0, w1) and torch.equal(b0, b1)
    assert pool0 == pool1 == (2, 64, 8)  # every process's pool, gathered for the checkpoint
    assert since0 == since1 and since0.count(0) == count0
