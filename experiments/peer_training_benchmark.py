"""Training-step throughput against SAELens' and sparsify's own training steps, on the same activations, in one run.

A benchmark, not a test: it answers issue 24's "training speed at the real width, against both peers". Neither
peer is a dependency of this project: each lives in its own virtual environment, and this file runs in all three.
The driver (our environment) writes one batch of synthetic activations (seeded Gaussian, ``[batch, d]``, float32,
``activations.npy``), times our steps, then runs this same file under each peer's Python (``step`` subcommand),
which times that library's step on the same batch and prints one JSON line. Every side times its step with the
same loop (``fastest``: the fastest of ``--repeats`` calls after two untimed ones), and the driver prints one table
and, last, one JSON object with every figure.

The steps timed, each on a fresh dictionary of ``--features`` atoms over ``--d`` dimensions:

- ours: ``sae.bench.train_step`` (``reconstruction_loss`` + backward + fused Adam + decoder renormalisation: what
  ``DictionaryModule`` does without Lightning): ``relu_tied`` (the paper's ReLU/L1, our default), ``relu``
  (untied, like SAELens' ``standard``) and ``topk`` (k 32);
- SAELens: its ``SAETrainer._train_step`` (the training forward pass with its loss, firing counts, backward,
  gradient clipping, Adam, learning-rate and coefficient schedulers) on a ``standard`` (ReLU/L1) and a ``topk``
  (k 32) training SAE at its defaults;
- sparsify (``eai-sparsify``): what its ``Trainer`` does per batch at ``loss_fn=fvu``, ``optimizer=adam`` and
  ``auxk_alpha`` 0 (its defaults but the optimiser): decoder rows set to unit norm, ``SparseCoder`` forward (its
  fused TopK encoder and sparse decoder), ``fvu.backward()``, the gradient component along each decoder row
  removed, ``torch.optim.Adam`` step and ``zero_grad``.

Also printed: the fp32 GEMM peak of the encoder's shape (``[batch, d] @ [d, features]``, ``sae.bench.gemm_gflops``),
ReLU's fraction of it (10·d·D FLOP an activation) and our TopK step over the encoder's dense forward product alone
(``topk_step_over_encoder``: the one dense product a TopK step needs).

    # once: each peer's environment (outside the project; torch first, so no CUDA wheels come)
    python -m venv /path/to/venvs/sparsify && /path/to/venvs/sparsify/bin/pip install torch==2.13.0 eai-sparsify==1.3.3
    python -m venv /path/to/venvs/saelens && /path/to/venvs/saelens/bin/pip install torch==2.13.0 sae-lens==6.54.12
    python experiments/peer_training_benchmark.py --out <dir> --sparsify /path/to/venvs/sparsify/bin/python \\
        --saelens /path/to/venvs/saelens/bin/python            # --features 4096 32768 --batch 4096 --d 512

``docs/results/speed.md`` has the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACTS = "activations.npy"
K = 32
L1 = {"relu_tied": 0.04, "relu": 0.04, "saelens_relu": 5.0}  # the step's cost does not depend on the coefficient
PEERS = {"saelens": ("relu", "topk"), "sparsify": ("topk",)}
OURS = ("relu_tied", "relu", "topk")


def fastest(step: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``step`` after two untimed ones (the same loop for every library)."""
    step()
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def bias_shift(pre, l0: int):
    """``[features]``: what to subtract from the encoder bias so that each feature fires on ``l0 / features`` of
    the batch's rows (the mean L0 then ``l0``), given the pre-activations ``pre`` ``[batch, features]``: a trained
    ReLU/L1 dictionary's density instead of the half-dense codes of a fresh one."""
    rows = max(1, round(len(pre) * l0 / pre.shape[1]))
    return pre.kthvalue(len(pre) - rows, dim=0).values


def load_batch(path: Path):
    import numpy as np
    import torch

    return torch.from_numpy(np.load(path))


# --- each peer's step (run under that peer's Python) ------------------------------------------------------------
def saelens_step(variant: str, x, n_features: int, relu_l0: int | None = None) -> Callable[[], object]:
    """SAELens' own training step (``SAETrainer._train_step``) on batch ``x`` (ReLU: at mean L0 ``relu_l0``)."""
    import sae_lens as sl
    import torch
    from sae_lens.config import SAETrainerConfig

    common = {"d_in": x.shape[1], "d_sae": n_features, "device": "cpu"}
    if variant == "topk":
        sae = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(k=K, **common))
    else:
        sae = sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(l1_coefficient=L1["saelens_relu"], **common))
    cfg = SAETrainerConfig(total_training_samples=100 * len(x), train_batch_size_samples=len(x), lr=3e-4, lr_end=3e-4,
                           device="cpu",
                           logger=sl.LoggingConfig(log_to_wandb=False))
    trainer = sl.SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    if relu_l0 is not None and variant == "relu":
        with torch.no_grad():
            sae.b_enc -= bias_shift(sae.encode_with_hidden_pre(x)[1], relu_l0)
    return lambda: trainer._train_step(sae, x)


def sparsify_step(variant: str, x, n_features: int, relu_l0: int | None = None) -> Callable[[], object]:
    """sparsify's per-batch training work (its ``Trainer`` at ``loss_fn=fvu``, ``optimizer=adam``) on batch ``x``."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    if variant != "topk":
        raise SystemExit(f"sparsify trains TopK coders only, not {variant}")
    sae = SparseCoder(x.shape[1], SparseCoderConfig(k=K, num_latents=n_features), device="cpu", dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n_features / 2**14) ** 0.5)  # its trainer's default lr
    did_fire = torch.zeros(n_features, dtype=torch.bool)

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=(x - x.mean(0)).pow(2).sum())
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return step


def peer_main(args: argparse.Namespace) -> None:
    """Time one peer's step on the driver's batch; print ``{"seconds": ..., "version": ...}``."""
    import importlib.metadata

    import torch

    x = load_batch(args.acts)
    make = {"saelens": saelens_step, "sparsify": sparsify_step}[args.library]
    seconds = fastest(make(args.variant, x, args.features, args.relu_l0), args.repeats)
    package = {"saelens": "sae-lens", "sparsify": "eai-sparsify"}[args.library]
    print(json.dumps({"seconds": seconds, "version": importlib.metadata.version(package),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


# --- the driver (our environment) -------------------------------------------------------------------------------
def run_peer(python: str, library: str, variant: str, acts: Path, n_features: int, repeats: int,
             relu_l0: int | None = None) -> dict:
    command = [python, str(Path(__file__).resolve()), "step", "--library", library, "--variant", variant,
               "--acts", str(acts), "--features", str(n_features), "--repeats", str(repeats)]
    command += [] if relu_l0 is None else ["--relu-l0", str(relu_l0)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{library} {variant} step failed (its Python: {python}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def encoder_seconds(x, n_features: int, repeats: int) -> float:
    """The encoder's dense forward product alone, ``x @ W.T`` for ``W`` ``[n_features, d]``."""
    import torch

    w = torch.randn(n_features, x.shape[1]) / x.shape[1] ** 0.5
    return fastest(lambda: x @ w.T, repeats)


def ours(x, n_features: int, repeats: int, variants=OURS, relu_l0: int | None = None) -> dict:
    """Our steps' seconds by variant (``sae.bench.train_step``; ReLU at mean L0 ``relu_l0`` if given)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from sae.bench import HPARAMS, train_step
    from sae.dictionaries.base import encoder_affine

    seconds = {}
    for variant in variants:
        hparams = {"l1_coeff": L1[variant]} if variant.startswith("relu") else HPARAMS[variant]
        step = train_step(variant, x.shape[1], n_features, hparams=hparams)
        if relu_l0 is not None and variant.startswith("relu"):
            d = step.dictionary
            with torch.no_grad():
                weight = d.encoder_weight()
                d.b_enc -= bias_shift(x / d.scale @ weight.T + encoder_affine(weight, d.b_enc, d.b_dec), relu_l0)
        seconds[variant] = fastest(lambda step=step: step(x), repeats)
    return seconds


def relu_at_l0(args: argparse.Namespace, acts: Path, x, n_features: int, peak: float) -> dict:
    """The ReLU steps, ours and SAELens', at each mean L0 of ``--relu-l0`` (a trained dictionary's density)."""
    batch, d = x.shape
    figures = {}
    for l0 in args.relu_l0:
        rates = {f"ours_{variant}": batch / seconds
                 for variant, seconds in ours(x, n_features, args.repeats, ("relu_tied", "relu"), l0).items()}
        rates["saelens_relu"] = batch / run_peer(args.saelens, "saelens", "relu", acts, n_features, args.repeats,
                                                 l0)["seconds"]
        for name, rate in rates.items():
            figures[f"{name}_l0_{l0}_acts_per_s"] = rate
        for variant in ("relu_tied", "relu"):
            figures[f"ours_{variant}_over_saelens_l0_{l0}"] = rates[f"ours_{variant}"] / rates["saelens_relu"]
        figures[f"ours_relu_tied_l0_{l0}_frac_of_peak"] = rates["ours_relu_tied"] * 10 * d * n_features / (peak * 1e9)
    return figures


def width_figures(args: argparse.Namespace, acts: Path, x, n_features: int) -> dict:
    """Every figure at one width, in the order: GEMM peak, our steps, the peers' steps."""
    sys.path.insert(0, str(ROOT))
    from sae.bench import gemm_gflops

    batch, d = x.shape
    peak = gemm_gflops(batch, d, n_features, args.repeats)
    figures = {"gemm_gflops": peak, "encoder_forward_s": encoder_seconds(x, n_features, args.repeats)}
    for variant, seconds in ours(x, n_features, args.repeats).items():
        figures[f"ours_{variant}_acts_per_s"] = batch / seconds
    for library, python in (("saelens", args.saelens), ("sparsify", args.sparsify)):
        for variant in PEERS[library]:
            result = run_peer(python, library, variant, acts, n_features, args.repeats)
            figures[f"{library}_{variant}_acts_per_s"] = batch / result["seconds"]
            figures[f"{library}_version"], figures[f"{library}_threads"] = result["version"], result["threads"]
    flop = 10 * d * n_features
    for variant in ("relu_tied", "relu"):
        figures[f"ours_{variant}_frac_of_peak"] = figures[f"ours_{variant}_acts_per_s"] * flop / (peak * 1e9)
        rate = figures[f"ours_{variant}_acts_per_s"]
        figures[f"ours_{variant}_over_saelens"] = rate / figures["saelens_relu_acts_per_s"]
    figures["saelens_relu_frac_of_peak"] = figures["saelens_relu_acts_per_s"] * flop / (peak * 1e9)
    figures["ours_topk_over_sparsify"] = figures["ours_topk_acts_per_s"] / figures["sparsify_topk_acts_per_s"]
    figures["ours_topk_over_saelens"] = figures["ours_topk_acts_per_s"] / figures["saelens_topk_acts_per_s"]
    figures["topk_step_over_encoder"] = batch / figures["ours_topk_acts_per_s"] / figures["encoder_forward_s"]
    return {**figures, **relu_at_l0(args, acts, x, n_features, peak)}


def print_table(results: dict, batch: int, d: int) -> None:
    print(f"\nd {d}, batch {batch}, k {K}; activations/s (the fastest of the timed steps)")
    print(f"{'features':>9} | {'GEMM GFLOP/s':>12} | {'ours relu_tied':>14} | {'ours relu':>9} | "
          f"{'SAELens relu':>12} | {'ours topk':>9} | {'sparsify topk':>13} | {'SAELens topk':>12}")
    for n, f in results.items():
        print(f"{n:>9} | {f['gemm_gflops']:>12.1f} | {f['ours_relu_tied_acts_per_s']:>14,.0f} | "
              f"{f['ours_relu_acts_per_s']:>9,.0f} | {f['saelens_relu_acts_per_s']:>12,.0f} | "
              f"{f['ours_topk_acts_per_s']:>9,.0f} | {f['sparsify_topk_acts_per_s']:>13,.0f} | "
              f"{f['saelens_topk_acts_per_s']:>12,.0f}")
    for n, f in results.items():
        print(f"{n} features: ReLU (tied) {f['ours_relu_tied_frac_of_peak']:.2f} of the GEMM peak "
              f"(untied {f['ours_relu_frac_of_peak']:.2f}, SAELens {f['saelens_relu_frac_of_peak']:.2f}), "
              f"{f['ours_relu_tied_over_saelens']:.2f}x SAELens (untied {f['ours_relu_over_saelens']:.2f}x); "
              f"TopK {f['ours_topk_over_sparsify']:.2f}x sparsify, {f['ours_topk_over_saelens']:.2f}x SAELens; "
              f"TopK step / encoder forward product {f['topk_step_over_encoder']:.2f}")
        for l0 in sorted({int(key.split("_")[-1]) for key in f if key.startswith("ours_relu_tied_over_saelens_l0_")}):
            print(f"{n} features, ReLU at mean L0 {l0}: ours (tied) {f[f'ours_relu_tied_l0_{l0}_acts_per_s']:,.0f}, "
                  f"untied {f[f'ours_relu_l0_{l0}_acts_per_s']:,.0f}, "
                  f"SAELens {f[f'saelens_relu_l0_{l0}_acts_per_s']:,.0f} "
                  f"activations/s: {f[f'ours_relu_tied_over_saelens_l0_{l0}']:.2f}x SAELens "
                  f"(untied {f[f'ours_relu_over_saelens_l0_{l0}']:.2f}x)")


def driver_main(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    for library, python in (("saelens", args.saelens), ("sparsify", args.sparsify)):
        if not Path(python).is_file():
            raise SystemExit(f"--{library} {python}: no such Python (make the peer's environment: see this file's "
                             "docstring)")
    args.out.mkdir(parents=True, exist_ok=True)
    acts = args.out / ACTS
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.d, generator=generator) / args.d**0.5
    np.save(acts, x.numpy())
    results = {}
    for n_features in args.features:
        results[n_features] = width_figures(args, acts, x, n_features)
        print(f"{n_features} features: " + json.dumps(results[n_features]), flush=True)
    print_table(results, args.batch, args.d)
    print(json.dumps({"d": args.d, "batch": args.batch, "k": K, "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "widths": {str(n): f for n, f in results.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("step", help="a peer's environment: time its step on the driver's batch")
    p.add_argument("--library", choices=sorted(PEERS), required=True)
    p.add_argument("--variant", choices=["relu", "topk"], required=True)
    p.add_argument("--acts", type=Path, required=True)
    p.add_argument("--features", type=int, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--relu-l0", type=int, help="the ReLU step at this mean L0")
    parser.add_argument("--out", type=Path, help="where the batch is written")
    parser.add_argument("--saelens", default="", help="the SAELens environment's python")
    parser.add_argument("--sparsify", default="", help="the sparsify (eai-sparsify) environment's python")
    parser.add_argument("--features", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--d", type=int, default=512, help="activation width (Pythia-70M's: 512)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per figure; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relu-l0", type=int, nargs="*", default=[],
                        help="also time the ReLU steps (ours, SAELens') with the encoder bias set for these mean L0s, "
                             "as a trained dictionary's (a fresh one's codes are half dense)")
    args = parser.parse_args()
    if args.command == "step":
        peer_main(args)
    elif args.out is None:
        parser.error("--out is needed (where the batch is written)")
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
