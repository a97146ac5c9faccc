"""Features scored per minute, per backend and per scorer, on this machine.

    python -m sae.autointerp.bench --backends token_lookup,hf_local,openai --n-features 4

Features are planted on real text (the Pythia tokenizer and held-out OpenWebText from ../shared/fixtures when
present, else random words) with the paper's sizes: 64-token fragments, 5 explained, 5 top + 5 random
simulated, detection and fuzzing on 3 quantiles x 2 activating fragments and as many silent ones. `openai` is
timed against the package's own OpenAI-compatible server over the same in-process model on 127.0.0.1, so its
figure is the local model plus the HTTP round trips. The cache is off: every request is computed. The load
average is printed before and after: a figure taken while other jobs ran is only good for comparisons.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from sae.autointerp.records import RecordConfig, build_records, decoder_from_tokenizer, iter_feature_activations
from sae.autointerp.study import fuzz_cases
from sae.errors import ConfigError, exit_on_config_error

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
STAGES = ("explain", "simulation", "detection", "fuzzing")


def planted(n_features: int, fragment_len: int = 64, n_frag: int = 400, seed: int = 0):
    """(FeatureActivations list, decode): feature j fires on the j-th most common token id of the text."""
    tok_dir, text = FIXTURES / "pythia-tokenizer", FIXTURES / "text" / "openwebtext-1k.jsonl"
    if tok_dir.is_dir() and text.is_file():
        import json

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        docs = [json.loads(line)["text"] for line in open(text)][900:]
        flat = [i for enc in tok(docs, verbose=False).input_ids for i in enc]
        ids = torch.tensor(flat[: n_frag * fragment_len]).reshape(n_frag, fragment_len)
        decode = decoder_from_tokenizer(tok)
    else:
        words = "the a cat dog sat ran on under mat log big small red blue and then it was very quick slow".split()
        ids = torch.randint(0, len(words), (n_frag, fragment_len), generator=torch.Generator().manual_seed(seed))
        decode = lambda xs: [f" {words[i]}" for i in xs]  # noqa: E731
    common = torch.bincount(ids.flatten()).argsort(descending=True)[5: 5 + n_features]  # skip the very commonest
    gen = torch.Generator().manual_seed(seed)
    codes = torch.stack([(ids == t).float() * (1 + torch.rand(ids.shape, generator=gen)) for t in common], -1)
    return list(iter_feature_activations("bench", "blocks.3.hook_resid_post", 3, codes, ids,
                                         list(range(n_features)), fragment_len)), decode


def time_stages(interp, records) -> dict[str, float]:
    """Seconds per stage for all the records (each stage one batched call, as the study makes them)."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    expls = interp.explain(records)
    out["explain"] = time.perf_counter() - t
    print(f"  {interp.name} explained: " + "; ".join(repr(e.text) for e in expls[:3]), file=sys.stderr)
    expls = [e if e.text else type(e)("tokens", e.raw, e.lookup) for e in expls]  # time every stage in full
    t = time.perf_counter()
    interp.simulate([(e, f) for r, e in zip(records, expls) for f in (*r.score_top, *r.score_random)])
    out["simulation"] = time.perf_counter() - t
    t = time.perf_counter()
    interp.detect([(e, f) for r, e in zip(records, expls) for f in (*r.positives, *r.negatives)])
    out["detection"] = time.perf_counter() - t
    t = time.perf_counter()
    interp.fuzz([(e, f, m) for r, e in zip(records, expls) for f, m, _ in fuzz_cases(r, 0)])
    out["fuzzing"] = time.perf_counter() - t
    return out


@contextlib.contextmanager
def interpreters(names: list[str], model: str | None, batch_size: int) -> Iterator[dict]:
    """The interpreters to time; the local model is loaded once and shared by hf_local and the openai server."""
    from sae.autointerp.backends.token_lookup import TokenLookup
    from sae.autointerp.interpret import LLMInterpreter

    found: dict = {}
    if "token_lookup" in names:
        found["token_lookup"] = TokenLookup()
    local = None
    if {"hf_local", "openai"} & set(names):
        from sae.autointerp.backends.hf_local import HFLocalBackend

        spec = model or str(FIXTURES / "smollm2-135m-instruct")
        t = time.perf_counter()
        local = HFLocalBackend.load(spec, batch_size=batch_size)
        print(f"loaded {local.model} ({local.describe()['params']} parameters) in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        if "hf_local" in names:
            found["hf_local"] = LLMInterpreter(local)
    with contextlib.ExitStack() as stack:
        if "openai" in names:
            from sae.autointerp.backends.openai_api import OpenAIBackend
            from sae.autointerp.serve import create_app, running

            url = stack.enter_context(running(create_app(local, served_name="bench")))
            found["openai"] = LLMInterpreter(OpenAIBackend(url, "bench", api_key_env=None, concurrency=batch_size))
        yield found


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="token_lookup,hf_local,openai")
    parser.add_argument("--n-features", type=int, default=4)
    parser.add_argument("--model", default=None, help="hf_local model (default: the SmolLM2 fixture)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("token_lookup", "hf_local", "openai")]
    if unknown:
        raise ConfigError(f"--backends: unknown {unknown}; expected token_lookup, hf_local, openai")
    feats, decode = planted(args.n_features)
    records = [r for r in (build_records(fa, RecordConfig(), decode, seed=0) for fa in feats) if r is not None]
    if not records:
        raise ConfigError("bench: no planted feature has enough active fragments")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch threads "
          f"{torch.get_num_threads()}; {len(records)} features", file=sys.stderr)
    rows = []
    with interpreters(names, args.model, args.batch_size) as found:
        for name, interp in found.items():
            secs = time_stages(interp, records)
            rows.append((name, secs))
            print(f"{name}: " + ", ".join(f"{s} {secs[s]:.2f} s" for s in STAGES), file=sys.stderr)
    print(f"load average after: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print("features scored per minute (paper sizes; each column alone, and explain + each scorer):")
    print(f"{'backend':<13}" + "".join(f"{s:>12}" for s in STAGES) + "".join(f"{'+' + s:>14}" for s in STAGES[1:]))
    for name, secs in rows:
        per = lambda s: 60 * len(records) / max(s, 1e-9)  # noqa: E731
        print(f"{name:<13}" + "".join(f"{per(secs[s]):>12.1f}" for s in STAGES)
              + "".join(f"{per(secs['explain'] + secs[s]):>14.1f}" for s in STAGES[1:]))


if __name__ == "__main__":
    main()
