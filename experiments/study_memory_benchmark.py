"""Peak memory and wall time of every study at a real model's shape, against the dictionary's width.

A benchmark, not a test. For each width (default 4,096, 16,384 and 32,768 features) it trains, unless already there,
one short run of TopK dictionaries (k 32) at blocks 0, 1 and 3 of ``--model`` (a GPT-NeoX of a real shape with random
weights: ``python -m sae.lm.shapes pythia-70m <dir>``); quality does not matter here, only the shapes. Then it runs
each study at its default settings in a fresh process under ``/usr/bin/time -v``, on the block-3 dictionary
(``analysis=circuits``: on the set, target ``--circuit-target``, the block-0 and block-1 dictionaries), and prints one
line per study: peak resident memory (``Maximum resident set size``) and wall time. Last, one JSON object with every
figure, and the curve (peak RSS against features, one line per study, the 6 GB bound) drawn to ``--plot``.

    python experiments/study_memory_benchmark.py --model <shape dir> --runs <dir for the runs> --plot docs/<name>.png

A study still running after ``--timeout`` seconds is stopped (SIGTERM); its line then says so and gives the peak
reached until then. Every run's log is kept beside its output under ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
TEXT = FIXTURES / "text" / "openwebtext-1k.jsonl"
IOI_VOCABULARY = FIXTURES / "neox-ioi-14m" / "ioi_vocabulary.json"
SET = "[{name:layer0,hook:{layer:0}},{name:layer1,hook:{layer:1}},{name:layer3,hook:{layer:3}}]"
STUDIES = ("features", "metrics", "residue", "patching", "circuits", "autointerp")
BOUND_GB = 6.0
PEAK = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)")


def train(model: Path, run: Path, features: int, d_model: int, tokens: int) -> None:
    """The set of three TopK dictionaries of ``features`` features, unless ``run`` already holds it."""
    if (run / "layer3" / "sae.json").is_file():
        return
    overrides = [f"model.name_or_path={model}", "data=text_files", f"data.path={TEXT}", "logger=csv", "sae=topk",
                 f"sae.ratio={features // d_model}", "sae.k=32", f"train.tokens={tokens}", "data.eval_tokens=2048",
                 f"dictionaries={SET}", f"hydra.run.dir={run}"]
    print(f"training {run.name} ({features:,} features)", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def study_overrides(study: str, run: Path, eval_tokens: int, target: str) -> list[str]:
    """``evaluate.py``'s arguments for ``study`` at its default settings."""
    common = [f"analysis={study}", f"eval_tokens={eval_tokens}"]
    if study == "circuits":
        return [f"run={run}", *common, "analysis.dictionaries=[layer0,layer1]", f"target={target}"]
    task = ["task=ioi", f"task.vocabulary={IOI_VOCABULARY}"] if study == "patching" else []
    return [f"run={run / 'layer3'}", *common, *task]


def seconds(clock: str) -> float:
    """``/usr/bin/time``'s ``[h:]m:ss.ss`` in seconds."""
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def measure(overrides: list[str], out: Path, timeout: float) -> dict:
    """One ``evaluate.py`` run under ``/usr/bin/time -v``: its peak RSS (GB), wall seconds, exit status."""
    out.mkdir(parents=True, exist_ok=True)
    command = ["/usr/bin/time", "-v", "timeout", str(int(timeout)), sys.executable, str(ROOT / "evaluate.py"),
               *overrides, f"out={out}"]
    start = time.perf_counter()
    with open(out / "run.log", "w") as log:
        proc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    text = (out / "run.log").read_text()
    peak, wall = PEAK.search(text), WALL.search(text)
    return {"peak_gb": int(peak[1]) * 1024 / 1e9 if peak else None,
            "wall_s": seconds(wall[1]) if wall else time.perf_counter() - start,
            "status": {0: "ok", 124: "timeout"}.get(proc.returncode, f"exit {proc.returncode}")}


def gemm_gflops(n: int = 4096, repeats: int = 3) -> float:
    """This machine's fp32 matrix-product speed (GFLOP/s, best of ``repeats``), printed beside the wall times."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plot(figures: dict, path: Path, label: str) -> None:
    from sae.evaluation.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for study, by_width in ((k, v) for k, v in figures.items() if k in STUDIES):
        widths = sorted(int(w) for w in by_width)
        ax.plot(widths, [by_width[str(w)]["peak_gb"] for w in widths], marker="o", label=study)
    ax.axhline(BOUND_GB, color="k", linestyle="--", linewidth=1, label=f"{BOUND_GB:g} GB bound")
    ax.set(xlabel="dictionary features", ylabel="peak RSS (GB)", xscale="log", ylim=(0, None))
    ax.set_xticks(widths, [f"{w:,}" for w in widths])
    ax.minorticks_off()  # a log axis' own labels (4 x 10^3, ...) would overprint the widths
    ax.legend(fontsize=8)
    save_figure(fig, path, label)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the model directory (python -m sae.lm.shapes)")
    parser.add_argument("--runs", type=Path, required=True, help="where the dictionaries and the studies' outputs go")
    parser.add_argument("--features", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=STUDIES)
    parser.add_argument("--train-tokens", type=int, default=20_000, help="train.tokens of each set (shapes only)")
    parser.add_argument("--eval-tokens", type=int, default=8192,
                        help="held-out tokens of every study (eval_tokens=); the memory bound does not depend on it")
    parser.add_argument("--circuit-target", default="layers.1.resid:0")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a study is stopped")
    parser.add_argument("--plot", type=Path, help="the curve's PNG")
    parser.add_argument("--label", default="Pythia-70M shape, random weights: speed and memory only")
    args = parser.parse_args(argv)
    if not TEXT.is_file():
        raise SystemExit(f"{TEXT} is absent: this benchmark needs ../shared/fixtures")
    d_model = json.loads((args.model / "config.json").read_text())["hidden_size"]
    results_path = args.runs / "study_memory.json"
    figures: dict = json.loads(results_path.read_text()) if results_path.is_file() else {}
    gemm = gemm_gflops()
    print(f"GEMM (4096 x 4096 fp32, this process's threads): {gemm:.1f} GFLOP/s", flush=True)
    for features in args.features:
        run = args.runs / f"set{features}"
        train(args.model, run, features, d_model, args.train_tokens)
        for study in args.studies:
            overrides = study_overrides(study, run, args.eval_tokens, args.circuit_target)
            result = measure(overrides, run / f"eval-{study}", args.timeout)
            figures.setdefault(study, {})[str(features)] = result
            print(f"{study} at {features:,} features: peak RSS {result['peak_gb']:.2f} GB, "
                  f"wall {result['wall_s']:.0f} s ({result['status']})", flush=True)
            results_path.write_text(json.dumps(figures, indent=1))
    figures["gemm_gflops"] = gemm
    if args.plot:
        plot(figures, args.plot, args.label)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
