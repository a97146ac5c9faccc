"""The throughput benchmark runs at toy sizes and ends with one parseable JSON line."""

import json
import subprocess
import sys

from tests.conftest import FIXTURES, ROOT, needs_cuda

KEYS = {"gemm_gflops", "relu_frac_of_peak", "topk_over_relu", "lm_over_full_forward", "kl_from_states_speedup",
        "ensemble_speedup", "eval_over_forward_bound"}


def test_bench_runs_tiny_and_prints_json(tmp_path):
    small_text = tmp_path / "docs.jsonl"
    if FIXTURES.is_dir():  # the set comparison trains on the first 60 documents only, to stay quick
        lines = (FIXTURES / "text" / "openwebtext-1k.jsonl").read_text().splitlines()[:60]
        small_text.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "sae.bench", "--d", "16", "--features", "64", "--batch", "256",
                           "--repeats", "1", "--dicts", "2", "--ensemble-tokens", "4096",
                           "--ensemble-eval-tokens", "256", "--override", f"data.path={small_text}",
                           "stream.buffer_size=2048", "train.batch_size=256", "train.init_tokens=1024"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert KEYS <= figures.keys() and figures["gemm_gflops"] > 0 and figures["topk_over_relu"] > 0
    assert (figures["lm_over_full_forward"] is not None) == FIXTURES.is_dir()
    assert (figures["ensemble_speedup"] is not None) == FIXTURES.is_dir()
    assert (figures["kl_from_states_speedup"] is not None) == FIXTURES.is_dir()
    assert (figures["eval_over_forward_bound"] is not None) == FIXTURES.is_dir()
    if FIXTURES.is_dir():
        assert figures["eval_over_forward_bound"] > 0 and figures["eval_tokens"] == 4096
        assert figures["ensemble_dicts"] == 2 and figures["ensemble_end_to_end_speedup"] > 0


def test_bench_device_option():
    """``--device cuda`` without CUDA is one line (exit 2); with CUDA (marked ``cuda``: see the next test) it runs."""
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, "-m", "sae.bench", "--device", "cuda", "--no-lm"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "this machine has no CUDA device (use --device cpu or auto)"
    )


@needs_cuda
def test_bench_on_cuda():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae.bench",
            "--device",
            "cuda",
            "--d",
            "16",
            "--features",
            "64",
            "--batch",
            "256",
            "--repeats",
            "1",
            "--no-lm",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["device"].startswith("cuda") and figures["topk_over_relu"] > 0
