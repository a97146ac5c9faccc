"""The throughput benchmark runs at toy sizes and ends with one parseable JSON line."""

import json
import subprocess
import sys

from tests.conftest import FIXTURES, ROOT

KEYS = {"gemm_gflops", "relu_frac_of_peak", "topk_over_relu", "lm_over_full_forward", "ensemble_speedup"}


def test_bench_runs_tiny_and_prints_json():
    done = subprocess.run([sys.executable, "-m", "sae.bench", "--d", "16", "--features", "64", "--batch", "256",
                           "--repeats", "1", "--dicts", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert KEYS <= figures.keys() and figures["gemm_gflops"] > 0 and figures["topk_over_relu"] > 0
    assert (figures["lm_over_full_forward"] is not None) == FIXTURES.is_dir()
    assert (figures["ensemble_speedup"] is not None) == FIXTURES.is_dir()
