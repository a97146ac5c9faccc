"""experiments/saelens_training_benchmark.py's dump (the batches a run trains on) and
experiments/kl_frontier_plot.py."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, hydra_conf, tiny_overrides


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dump_writes_the_training_streams_batches_in_order(tiny_lm_dir, tiny_text, tmp_path):
    """The dump is the run's own stream: every batch, in order, as a fresh datamodule of the same config yields
    them (float16, as the activation cache stores them), and its record names the SAELens hook."""
    from hydra import compose

    from sae.training.run import lm_setup
    from sae.training.validation import validate

    bench = _module("saelens_training_benchmark")
    overrides = [o for o in tiny_overrides(tiny_lm_dir, tiny_text, tmp_path / "run") if not o.startswith("hydra.")]
    bench.dump(tmp_path / "acts", overrides)
    rows = np.load(tmp_path / "acts" / bench.ACTS)
    meta = json.loads((tmp_path / "acts" / bench.META).read_text())
    assert rows.shape == (4096 // 128, 128, 32) and rows.dtype == np.float16
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["tokens"] == 4096

    with hydra_conf():
        cfg = compose("config", overrides=["logger=csv", *overrides])
    datamodule = lm_setup(cfg, validate(cfg)).datamodule
    datamodule.setup("fit")
    expected = [b["layers.1.resid"] for _, b in zip(range(len(rows)), datamodule.make_stream())]
    torch.testing.assert_close(torch.from_numpy(rows.astype(np.float32)),
                               torch.stack(expected).half().float())
    regrouped = next(bench.batches(tmp_path / "acts", 256))  # SAELens' batch: consecutive dumped batches
    torch.testing.assert_close(regrouped, torch.from_numpy(rows[:2].reshape(256, 32).astype(np.float32)))


def test_frontier_series_and_pareto_front():
    plot = _module("kl_frontier_plot")
    assert plot.series_of("ours/topk-k8-mse", {}) == "topk"
    assert (
        plot.series_of("saelens/batchtopk-k16-lr3e-3", {"saelens/batchtopk": "SAELens BatchTopK"})
        == "SAELens BatchTopK"
    )
    assert plot.pareto([(16, 0.05), (8, 0.1), (12, 0.2), (4, 0.3)]) == [(4, 0.3), (8, 0.1), (16, 0.05)]


def test_frontier_plot_writes_a_png(tmp_path):
    plot = _module("kl_frontier_plot")
    table = tmp_path / "eval.csv"
    table.write_text("name,kind,l0,kl_spliced\na-k8,dictionary,8,0.1\na-k16,dictionary,16,0.05\npca_topk,pca_topk,8,0.3\n")
    plot.plot(plot.read_rows(table), tmp_path / "f.png", "t", {})
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "none.csv").write_text("name,kind,l0,kl_spliced\npca_topk,pca_topk,8,0.3\n")
    with pytest.raises(SystemExit, match="no dictionary rows"):
        plot.read_rows(tmp_path / "none.csv")
