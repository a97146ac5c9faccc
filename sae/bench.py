"""Throughput benchmark: training steps against this machine's GEMM peak, and the LM's share of the work.

``python -m sae.bench`` prints one figure per line and, last, one JSON object with every figure. A train step is
``Dictionary.loss`` + backward + an Adam step on one batch of normalised activations (what ``DictionaryModule``
does, without Lightning or its logging); it is counted as 10·d·D FLOP per activation (encode, decode and three
backward products of 2·d·D each).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from sae.dictionaries import build
from sae.hooks import HookPoint, n_layers, read_activations

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
HPARAMS = {"relu_tied": {"l1_coeff": 0.04}, "topk": {"k": 32}}


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_gflops(batch: int, d: int, n_features: int, repeats: int) -> float:
    """fp32 GFLOP/s of a ``[batch, d] @ [d, n_features]`` product: the train step's own shape."""
    a, b = torch.randn(batch, d), torch.randn(d, n_features)
    return 2 * batch * d * n_features / best_seconds(lambda: a @ b, repeats) / 1e9


def train_step(variant: str, d: int, n_features: int, seed: int = 0) -> Callable[[torch.Tensor], None]:
    """One training step of a fresh dictionary (loss, backward, Adam) as a function of a batch."""
    torch.manual_seed(seed)
    dictionary = build(variant, d, n_features, **HPARAMS[variant])
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:
        out = dictionary.loss(x)
        (out["mse"] + out["sparsity"] + out["aux"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_seconds(variant: str, d: int, n_features: int, batch: int, repeats: int) -> float:
    x = torch.randn(batch, d) / d**0.5
    step = train_step(variant, d, n_features)
    return best_seconds(lambda: step(x), repeats)


def lm_figures(model_dir: Path, text: Path, batch: int, n_dicts: int, repeats: int) -> dict:
    """Activations/s of block 3 (cut-off forward) against a full forward, and ``n_dicts`` dictionaries (one per
    hook over all blocks, round robin) from one forward against one forward + step each, on ``batch`` tokens."""
    from sae.model import load_model, load_tokenizer
    from sae.text import load_documents, pack_contexts

    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    contexts = pack_contexts(load_documents("files", str(text))[:200], tokenizer, 256)
    ids = contexts[: max(1, batch // 256)]
    tokens = ids.numel()
    with torch.inference_mode():
        full = best_seconds(lambda: model(input_ids=ids, use_cache=False), repeats)
    cut = best_seconds(lambda: read_activations(model, [HookPoint(3)], ids), repeats)
    depth = n_layers(model)
    hooks = [HookPoint(i % depth) for i in range(n_dicts)]
    width = model.config.hidden_size
    steps = [train_step("relu_tied", width, 8 * width, seed=i) for i in range(n_dicts)]
    unique = sorted(set(hooks), key=lambda h: h.layer)
    acts = {h: a.flatten(0, 1) / a.std() for h, a in read_activations(model, unique, ids).items()}

    def shared() -> None:
        read_activations(model, unique, ids)
        for hook, step in zip(hooks, steps):
            step(acts[hook])

    def separate() -> None:
        for hook, step in zip(hooks, steps):
            read_activations(model, [hook], ids)
            step(acts[hook])

    return {"full_forward_tokens_per_s": tokens / full, "block3_acts_per_s": tokens / cut, "lm_over_full_forward": full / cut,
            "ensemble_speedup": best_seconds(separate, repeats) / best_seconds(shared, repeats), "lm_tokens": tokens}


def run(d: int, n_features: int, batch: int, repeats: int, lm: bool, n_dicts: int) -> dict:
    peak = gemm_gflops(batch, d, n_features, repeats)
    figures: dict = {"threads": torch.get_num_threads(), "d": d, "n_features": n_features, "batch": batch, "gemm_gflops": peak}
    print(f"fp32 GEMM [{batch}x{d}] @ [{d}x{n_features}], {figures['threads']} threads: {peak:.1f} GFLOP/s")
    for variant in HPARAMS:
        rate = batch / step_seconds(variant, d, n_features, batch, repeats)
        frac = rate * 10 * d * n_features / (peak * 1e9)
        figures[f"{variant}_acts_per_s"], figures[f"{variant}_frac_of_peak"] = rate, frac
        print(f"{variant} train step: {rate:,.0f} activations/s = {frac:.2f} of the GEMM peak (10·d·D FLOP each)")
    figures["relu_frac_of_peak"] = figures["relu_tied_frac_of_peak"]
    figures["topk_over_relu"] = figures["topk_acts_per_s"] / figures["relu_tied_acts_per_s"]
    print(f"topk / relu_tied: {figures['topk_over_relu']:.2f}x")
    figures.update(lm_over_full_forward=None, ensemble_speedup=None)
    if lm:
        figures.update(lm_figures(FIXTURES / "neox-owt-14m", FIXTURES / "text" / "openwebtext-1k.jsonl", batch, n_dicts, repeats))
        print(f"LM on {figures['lm_tokens']} tokens: block 3 {figures['block3_acts_per_s']:,.0f} activations/s, full forward "
              f"{figures['full_forward_tokens_per_s']:,.0f} tokens/s: {figures['lm_over_full_forward']:.2f}x")
        print(f"{n_dicts} dictionaries from one forward vs {n_dicts} forwards + steps: {figures['ensemble_speedup']:.2f}x")
    else:
        print("LM figures skipped (--no-lm, or ../shared/fixtures absent): lm_over_full_forward, ensemble_speedup null")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=512, help="activation width")
    parser.add_argument("--features", type=int, default=4096, help="dictionary atoms")
    parser.add_argument("--batch", type=int, default=4096, help="activations per step (and LM tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure; the fastest counts")
    parser.add_argument("--dicts", type=int, default=8, help="dictionaries in the shared-activations comparison")
    parser.add_argument("--no-lm", action="store_true", help="skip the figures that need ../shared/fixtures")
    args = parser.parse_args(argv)
    lm = not args.no_lm and FIXTURES.is_dir()
    print(json.dumps(run(args.d, args.features, args.batch, args.repeats, lm, args.dicts)))


if __name__ == "__main__":
    main()
