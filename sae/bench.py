"""Throughput benchmark: training steps against this machine's GEMM peak, and the LM's share of the work.

``python -m sae.bench`` prints one figure per line and, last, one JSON object with every figure. A train step is the
objective (``sae.training.objectives``) + backward + an Adam step on one batch of normalised activations (what
``DictionaryModule`` does, without Lightning or its logging); it is counted as 10·d·D FLOP per activation (encode,
decode and three backward products of 2·d·D each). The set comparison (``ensemble_speedup``) runs the real training
code: a set of dictionaries in one run against one run per dictionary over the same tokens.

``--device`` (``auto``: CUDA when there is one) runs everything there; on a GPU each timed call ends with a CUDA
synchronisation, so the times are those of the work done, not of the kernels queued.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sae.dictionaries import build
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture
from sae.training.objectives import reconstruction_loss

CONF = Path("conf")  # the application's config groups: run from the project's root, as the README's commands are
FIXTURES = Path("..") / "shared" / "fixtures"
EVAL_TEXT = FIXTURES / "text" / "openwebtext-1k.jsonl"  # the held-out evaluation's text
HPARAMS = {"relu_tied": {"l1_coeff": 0.04}, "topk": {"k": 32, "aux_coeff": 1 / 32, "k_aux": None}}


DEVICE = torch.device("cpu")  # where the figures are taken (``--device``)


def synchronise() -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, after one untimed warm-up call (each call synchronised)."""
    fn()
    synchronise()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronise()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_gflops(batch: int, d: int, n_features: int, repeats: int) -> float:
    """fp32 GFLOP/s of a ``[batch, d] @ [d, n_features]`` product: the train step's own shape."""
    a, b = torch.randn(batch, d, device=DEVICE), torch.randn(d, n_features, device=DEVICE)
    return 2 * batch * d * n_features / best_seconds(lambda: a @ b, repeats) / 1e9


def train_step(variant: str, d: int, n_features: int, seed: int = 0, bf16: bool = False,
               compiled: bool = False, hparams: dict | None = None) -> Callable[[torch.Tensor], None]:
    """One training step of a fresh dictionary (loss, backward, Adam) as a function of a batch; ``bf16``: the loss
    under bfloat16 autocast (what ``train.precision=bf16-mixed`` does), ``compiled``: the loss through
    ``torch.compile``; ``hparams``: the variant's settings (default ``HPARAMS[variant]``)."""
    torch.manual_seed(seed)
    dictionary = build(variant, d, n_features, **(HPARAMS[variant] if hparams is None else hparams)).to(DEVICE)
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=1e-4, fused=True)  # as DictionaryModule
    def loss(x: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(dictionary, x)[0]

    loss_fn = torch.compile(loss) if compiled else loss

    def step(x: torch.Tensor) -> None:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            value = loss_fn(x)
        value.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dictionary.normalise_atoms_()

    step.dictionary = dictionary  # for a caller that sets a trained state first (the peer benchmark's ReLU density)
    return step


def step_seconds(variant: str, d: int, n_features: int, batch: int, repeats: int, **options) -> float:
    x = torch.randn(batch, d, device=DEVICE) / d**0.5
    step = train_step(variant, d, n_features, **options)
    return best_seconds(lambda: step(x), repeats)


def option_figures(d: int, n_features: int, batch: int, repeats: int, fp32: dict[str, float]) -> dict:
    """Each variant's train step under bf16 autocast and through ``torch.compile``, against its fp32 eager step
    (``fp32``: activations/s by variant)."""
    figures = {}
    for variant in HPARAMS:
        for option in ("bf16", "compiled"):
            rate = batch / step_seconds(variant, d, n_features, batch, repeats, **{option: True})
            figures[f"{variant}_{option}_acts_per_s"] = rate
            figures[f"{variant}_{option}_speedup"] = rate / fp32[variant]
            print(
                f"{variant} train step, {option}: {rate:,.0f} activations/s = "
                f"{rate / fp32[variant]:.2f}x the fp32 eager step"
            )
    return figures


def lm_figures(model_dir: Path, text: Path, batch: int, repeats: int) -> dict:
    """Activations/s of block 3 (cut-off forward) against a full forward with unembedding, on ``batch`` tokens."""
    from sae.lm.model import load_model, load_tokenizer
    from sae.lm.text import load_documents, pack_contexts

    model, tokenizer = load_model(str(model_dir)).to(DEVICE), load_tokenizer(str(model_dir))
    contexts = pack_contexts(load_documents("files", str(text))[:200], tokenizer, 256)
    ids = contexts[: max(1, batch // 256)].to(DEVICE)
    tokens = ids.numel()
    with torch.inference_mode():
        full = best_seconds(lambda: model(input_ids=ids, use_cache=False), repeats)
    cut = best_seconds(lambda: capture(model, [HookPoint(3)], ids), repeats)
    return {
        "full_forward_tokens_per_s": tokens / full,
        "block3_acts_per_s": tokens / cut,
        "lm_over_full_forward": full / cut,
        "lm_tokens": tokens,
    }


def kl_figures(model_dir: Path, text: Path, repeats: int) -> dict:
    """Tokens/s of one step of the KL objective (``sae.training.spliced``: clean forward, spliced forward, KL,
    backward into the dictionary) for a TopK dictionary (k 8, 4x) at block 3 on 2 contexts of 256 tokens, with the
    KL from the final hidden states (the default) and from the logits."""
    from sae.lm.model import load_model, load_tokenizer
    from sae.lm.text import load_documents, pack_contexts, special_ids
    from sae.training.spliced import spliced_terms

    model, tokenizer = load_model(str(model_dir)).to(DEVICE).requires_grad_(False), load_tokenizer(str(model_dir))
    ids = pack_contexts(load_documents("files", str(text))[:50], tokenizer, 256)[:2].to(DEVICE)
    hook, width = HookPoint(3), model.config.hidden_size
    dictionary = build("topk", width, 4 * width, k=8, aux_coeff=1 / 32, k_aux=None).to(DEVICE)
    dictionary.init_from_data(capture(model, [hook], ids)[hook].flatten(0, 1).float())

    def step(from_states: bool) -> None:
        (terms,) = spliced_terms(model, ids, special_ids(tokenizer), [(hook, dictionary)], [[]], "each", from_states)
        terms.kl.backward()
        dictionary.zero_grad(set_to_none=True)

    fast, slow = (best_seconds(lambda s=s: step(s), repeats) for s in (True, False))
    return {"kl_step_tokens_per_s": ids.numel() / fast, "kl_step_logits_tokens_per_s": ids.numel() / slow,
            "kl_from_states_speedup": slow / fast}


def eval_figures(model_dir: Path, text: Path, tokens: int, ratio: int, repeats: int) -> dict:
    """The held-out evaluation (``heldout_metrics_many``) of one TopK dictionary (k 32, ``ratio`` × the model's
    width, at its middle block) on ``tokens`` tokens of contexts of 256, against the bare LM forwards it needs: per
    batch of 8 contexts, four plain whole forwards with logits (clean, spliced, zero- and mean-ablated), timed in
    the same run. Their ratio, ``eval_over_forward_bound``, is what the evaluation costs beyond those forwards (the
    mean's cut-off read, the dictionary, the losses): 1 would be the four forwards alone. The evaluation itself runs
    the blocks below the hook once per batch (its spliced and ablated runs start at the hook's block from the clean
    run's residual stream), so it can come in under 1."""
    from sae.evaluation.heldout import heldout_metrics_many
    from sae.lm.model import load_model, load_tokenizer
    from sae.lm.text import load_documents, pack_contexts, special_ids
    from sae.training.spliced import n_layers

    model, tokenizer = load_model(str(model_dir)).to(DEVICE), load_tokenizer(str(model_dir))
    contexts = pack_contexts(load_documents("files", str(text))[:200], tokenizer, 256)[: max(1, tokens // 256)]
    hook, width, special = HookPoint(n_layers(model.config) // 2), model.config.hidden_size, special_ids(tokenizer)
    torch.manual_seed(0)
    dictionary = build("topk", width, ratio * width, k=32, aux_coeff=1 / 32, k_aux=None).to(DEVICE)
    dictionary.init_from_data(capture(model, [hook], contexts[:1].to(DEVICE))[hook].flatten(0, 1).float())
    batch = 8  # heldout_metrics_many's default

    def forwards() -> None:
        with torch.no_grad():
            for start in range(0, len(contexts), batch):
                ids = contexts[start : start + batch].to(DEVICE)
                for _ in range(4):
                    model(input_ids=ids, use_cache=False)

    def evaluation() -> None:
        heldout_metrics_many(model, {"topk": dictionary}, hook, contexts, special, batch, progress=False)

    bare, evaluated = best_seconds(forwards, repeats), best_seconds(evaluation, repeats)
    return {"eval_model": model_dir.name, "eval_tokens": contexts.numel(), "eval_features": dictionary.n_features,
            "eval_seconds": evaluated, "eval_forward_seconds": bare, "eval_over_forward_bound": evaluated / bare}


def print_eval_figures(figures: dict) -> None:
    f = figures
    print(f"held-out evaluation on {f['eval_model']}, {f['eval_tokens']:,} tokens, a TopK dictionary of "
          f"{f['eval_features']:,} features: {f['eval_seconds']:.2f} s against {f['eval_forward_seconds']:.2f} s for "
          f"its four bare forwards per batch: eval_over_forward_bound {f['eval_over_forward_bound']:.2f}")


def ensemble_figures(
    model_dir: Path, text: Path, n_dicts: int, tokens: int, eval_tokens: int, overrides: list[str]
) -> dict:
    """The first ``n_dicts`` dictionaries of ``experiment=six_layers`` trained by ``sae.training.run.train`` in one run
    (one LM forward per batch) against one run each over the same tokens (a separate run is exactly the set member's own
    config, so it sees the same batches). Every run, shared or separate, is timed from start to finish: its own
    model load, tokenization, initialisation, training loop and held-out evaluation; the training loops alone are
    timed too (``status.json``)."""
    import tempfile

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from sae.training.config import register_schemas
    from sae.training.plan import resolve
    from sae.training.run import RunInfo, train

    register_schemas()

    def timed(run_cfg, directory: Path) -> tuple[float, float]:
        start = time.perf_counter()
        train(run_cfg, RunInfo(directory, directory.name, None))
        seconds = time.perf_counter() - start
        return seconds, json.loads((directory / "status.json").read_text())["seconds"]["train_loop"]

    # inside the application's config search path, as train.py runs (the set names another variant)
    with (
        initialize_config_dir(config_dir=str(CONF.resolve()), version_base="1.3"),
        tempfile.TemporaryDirectory() as tmp,
    ):
        cfg = compose("config", overrides=[
            "experiment=six_layers", f"model.name_or_path={model_dir}", "data=text_files", f"data.path={text}",
            "logger=csv", f"train.tokens={tokens}", f"data.eval_tokens={eval_tokens}",
            f"trainer.accelerator={'gpu' if DEVICE.type == 'cuda' else 'cpu'}", *overrides])
        with open_dict(cfg):
            cfg.dictionaries = cfg.dictionaries[:n_dicts]
        shared, shared_loop = timed(cfg, Path(tmp) / "shared")
        separate = [timed(plan.cfg, Path(tmp) / f"alone-{i}") for i, plan in enumerate(resolve(cfg))]
    separate_total, separate_loops = sum(s for s, _ in separate), sum(loop for _, loop in separate)
    return {"ensemble_dicts": n_dicts, "ensemble_tokens": tokens, "ensemble_eval_tokens": eval_tokens,
            "ensemble_shared_s": shared, "ensemble_shared_loop_s": shared_loop,
            "ensemble_separate_s": separate_total, "ensemble_separate_loop_s": separate_loops,
            "ensemble_speedup": separate_loops / shared_loop, "ensemble_end_to_end_speedup": separate_total / shared}


def run(args: argparse.Namespace) -> dict:
    global DEVICE
    DEVICE = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    d, n_features, batch, repeats = args.d, args.features, args.batch, args.repeats
    peak = gemm_gflops(batch, d, n_features, repeats)
    figures: dict = {
        "device": str(DEVICE),
        "threads": torch.get_num_threads(),
        "d": d,
        "n_features": n_features,
        "batch": batch,
        "gemm_gflops": peak,
    }
    print(f"fp32 GEMM [{batch}x{d}] @ [{d}x{n_features}] on {DEVICE}, {figures['threads']} threads: {peak:.1f} GFLOP/s")
    if args.eval_only:
        figures.update(eval_figures(Path(args.model), EVAL_TEXT, args.eval_tokens, args.eval_ratio, args.eval_repeats))
        print_eval_figures(figures)
        return figures
    for variant in HPARAMS:
        rate = batch / step_seconds(variant, d, n_features, batch, repeats)
        frac = rate * 10 * d * n_features / (peak * 1e9)
        figures[f"{variant}_acts_per_s"], figures[f"{variant}_frac_of_peak"] = rate, frac
        print(f"{variant} train step: {rate:,.0f} activations/s = {frac:.2f} of the GEMM peak (10·d·D FLOP each)")
    figures["relu_frac_of_peak"] = figures["relu_tied_frac_of_peak"]
    figures["topk_over_relu"] = figures["topk_acts_per_s"] / figures["relu_tied_acts_per_s"]
    print(f"topk / relu_tied: {figures['topk_over_relu']:.2f}x")
    if args.options:
        fp32 = {variant: figures[f"{variant}_acts_per_s"] for variant in HPARAMS}
        figures.update(option_figures(d, n_features, batch, repeats, fp32))
    figures.update(lm_over_full_forward=None, ensemble_speedup=None, kl_from_states_speedup=None,
                   eval_over_forward_bound=None)
    if args.no_lm or not FIXTURES.is_dir() or not CONF.is_dir():
        print("LM figures skipped (--no-lm, or ../shared/fixtures or ./conf absent: run from the project's root): "
              "lm_over_full_forward, kl_from_states_speedup, ensemble_speedup null")
        return figures
    model_dir, text = FIXTURES / "neox-owt-14m", FIXTURES / "text" / "openwebtext-1k.jsonl"
    figures.update(lm_figures(model_dir, text, batch, repeats))
    print(
        f"LM on {figures['lm_tokens']} tokens: block 3 {figures['block3_acts_per_s']:,.0f} activations/s, full forward "
        f"{figures['full_forward_tokens_per_s']:,.0f} tokens/s: {figures['lm_over_full_forward']:.2f}x"
    )
    figures.update(kl_figures(model_dir, text, args.repeats))
    print(f"KL objective step (TopK k 8 at block 3, 512 tokens): {figures['kl_step_tokens_per_s']:,.0f} tokens/s with "
          f"the KL from the final hidden states, {figures['kl_step_logits_tokens_per_s']:,.0f} from the logits: "
          f"{figures['kl_from_states_speedup']:.2f}x")
    figures.update(eval_figures(Path(args.model), text, args.eval_tokens, args.eval_ratio, args.eval_repeats))
    print_eval_figures(figures)
    figures.update(
        ensemble_figures(model_dir, text, args.dicts, args.ensemble_tokens, args.ensemble_eval_tokens, args.override)
    )
    n = args.dicts
    print(
        f"{n} dictionaries of experiment=six_layers on neox-owt-14m, {args.ensemble_tokens:,} tokens, held-out eval on "
        f"{args.ensemble_eval_tokens:,}: one run {figures['ensemble_shared_s']:.1f} s (training loop "
        f"{figures['ensemble_shared_loop_s']:.1f} s) against {n} separate runs {figures['ensemble_separate_s']:.1f} s "
        f"(loops {figures['ensemble_separate_loop_s']:.1f} s; each separate run loads the model, tokenizes, "
        "initialises "
        f"and evaluates on its own)"
    )
    print(
        f"  training loop: {figures['ensemble_speedup']:.2f}x; "
        f"end to end: {figures['ensemble_end_to_end_speedup']:.2f}x"
    )
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when there is one)")
    parser.add_argument("--d", type=int, default=512, help="activation width")
    parser.add_argument("--features", type=int, default=4096, help="dictionary atoms")
    parser.add_argument("--batch", type=int, default=4096, help="activations per step (and LM tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure; the fastest counts")
    parser.add_argument(
        "--dicts", type=int, default=8, help="dictionaries of experiment=six_layers in the set comparison"
    )
    parser.add_argument(
        "--ensemble-tokens", type=int, default=300_000, help="train.tokens of each run in the set comparison"
    )
    parser.add_argument("--ensemble-eval-tokens", type=int, default=4096, help="data.eval_tokens of those runs")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for those runs")
    parser.add_argument("--no-lm", action="store_true", help="skip the figures that need ../shared/fixtures")
    parser.add_argument(
        "--options", action="store_true", help="also time the step under bf16 autocast and torch.compile"
    )
    parser.add_argument("--model", default=str(FIXTURES / "neox-owt-14m"),
                        help="the LM of the held-out evaluation's figures (e.g. a sae.lm.shapes directory)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens of those figures")
    parser.add_argument("--eval-ratio", type=int, default=64, help="their TopK dictionary's features per width")
    parser.add_argument("--eval-repeats", type=int, default=1, help="timed evaluations (and forwards); fastest counts")
    parser.add_argument("--eval-only", action="store_true", help="only the GEMM and the held-out evaluation's figures")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device (use --device cpu or auto)")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
