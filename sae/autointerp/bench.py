"""Features scored per minute, per backend and per scorer, on this machine.

    python -m sae.autointerp.bench --backends token_lookup,hf_local,openai --n-features 4

Beside each hf_local figure it prints the bound the judge's own speed sets: the prompt tokens (prefill, with any
branch tokens folded into a prompt's forward) and generated tokens (decode) each feature's requests need, divided by
the model's batched prefill and decode throughput measured in the same run; the last line is JSON with
``hf_local_efficiency_<scorer>`` = achieved / bound (and the 4096^2 fp32 GEMM GFLOP/s of the machine, to compare
runs as ratios).

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
import json
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
    interp.simulate([(e, f) for r, e in zip(records, expls)
                     for f in (*r.score_top, *r.score_random, *r.score_random_active)])
    out["simulation"] = time.perf_counter() - t
    t = time.perf_counter()
    interp.detect([(e, f) for r, e in zip(records, expls) for f in (*r.positives, *r.negatives)])
    out["detection"] = time.perf_counter() - t
    t = time.perf_counter()
    interp.fuzz([(e, f, m) for r, e in zip(records, expls) for f, m, _ in fuzz_cases(r, 0)])
    out["fuzzing"] = time.perf_counter() - t
    return out


class TokenCounter:
    """Wraps an in-process backend: counts the prompt tokens (prefill) and generated tokens (decode) of each stage."""

    def __init__(self, inner):
        self.inner, self.name, self.model, self.endpoint = inner, inner.name, inner.model, inner.endpoint
        self.batch_size, self.folds_branches = inner.batch_size, inner.folds_branches
        self.prefill = self.decode = self.prompts = 0

    def chat(self, requests):
        self.prompts += len(requests)
        for r in requests:
            self.prefill += len(self.inner.tok(self.inner._render(r.messages) + r.prefix,
                                               add_special_tokens=False).input_ids)
        responses = self.inner.chat(requests)
        for r, resp in zip(requests, responses):  # what was generated (at least one token each)
            new = resp.text[len(r.prefix):]
            self.decode += max(1, min(r.max_tokens, len(self.inner.tok(new, add_special_tokens=False).input_ids)))
        return responses

    def prompt_logprobs(self, requests):
        self.prompts += len(requests)
        for r in requests:  # the prompt, and any branch folded into its forward (a few tokens per position)
            ids, offsets = self.inner._encode_with_offsets(r.prompt)
            branches = self.inner._branch_tokens(r.prompt, offsets, r.positions, r.branch) if r.branch else []
            self.prefill += len(ids) + sum(len(b) for _, b in branches)
        return self.inner.prompt_logprobs(requests)

    def branch_logprobs(self, requests):
        self.prompts += len(requests)
        for r in requests:
            ids, branches = self.inner._branch_layout(r)
            self.prefill += len(ids) + sum(len(b) for _, b in branches)
        return self.inner.branch_logprobs(requests)

    def check_prompt_logprobs(self) -> None:
        self.inner.check_prompt_logprobs()

    def describe(self) -> dict:
        return self.inner.describe()


def judge_throughput(backend, batch_size: int, prompt_len: int = 512, new_tokens: int = 16) -> dict[str, float]:
    """The judge's own batched rates on this machine: prefill tokens/s (a forward over batch x prompt_len tokens, the
    LM head at the last position only, as scoring reads it) and decode tokens/s (generation of new_tokens after it)."""
    from transformers import GenerationConfig

    lm, tok = backend.lm, backend.tok
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(len(tok), 20_000), (batch_size, prompt_len), generator=gen).to(backend.device)
    with torch.no_grad():
        lm.base_model(input_ids=ids[:, :32])  # warm up
        t = time.perf_counter()
        lm.base_model(input_ids=ids)
        prefill_s = time.perf_counter() - t
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=None)
        t = time.perf_counter()
        lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        decode_s = max(1e-9, time.perf_counter() - t - prefill_s)
    return {"prefill_tok_s": batch_size * prompt_len / prefill_s, "decode_tok_s": batch_size * new_tokens / decode_s}


def counted_stages(backend, records) -> tuple[dict[str, float], dict[str, tuple[int, int, int]]]:
    """Each stage alone through a TokenCounter: seconds and (prefill tokens, decode tokens, prompts) per stage."""
    from sae.autointerp.interpret import LLMInterpreter

    counter = TokenCounter(backend)
    interp = LLMInterpreter(counter)
    seconds, tokens = {}, {}
    for stage in STAGES:
        counter.prefill = counter.decode = counter.prompts = 0
        t = time.perf_counter()
        _run_stage(interp, records, stage)
        seconds[stage] = time.perf_counter() - t
        tokens[stage] = (counter.prefill, counter.decode, counter.prompts)
    return seconds, tokens


def _run_stage(interp, records, stage: str) -> None:
    expls = interp.explain(records) if stage == "explain" else _fixed_explanations(records)
    if stage == "simulation":
        interp.simulate([(e, f) for r, e in zip(records, expls)
                         for f in (*r.score_top, *r.score_random, *r.score_random_active)])
    elif stage == "detection":
        interp.detect([(e, f) for r, e in zip(records, expls) for f in (*r.positives, *r.negatives)])
    elif stage == "fuzzing":
        interp.fuzz([(e, f, m) for r, e in zip(records, expls) for f, m, _ in fuzz_cases(r, 0)])


def _fixed_explanations(records):
    from sae.autointerp.interpret import Explanation

    return [Explanation(f"the token {r.explain[0].tokens[0]!r} and similar words", "") for r in records]


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
    rows, bounds = [], {}
    with interpreters(names, args.model, args.batch_size) as found:
        for name, interp in found.items():
            if name == "hf_local":
                secs, tokens = counted_stages(interp.backend, records)
                # the judge's rates at each stage's own batch and mean prompt length, so the bound is an upper bound
                rates = {s: judge_throughput(interp.backend, max(1, min(args.batch_size, tokens[s][2])),
                                             prompt_len=max(16, tokens[s][0] // max(1, tokens[s][2])))
                         for s in STAGES}
                bounds = {s: tokens[s][0] / rates[s]["prefill_tok_s"] + tokens[s][1] / rates[s]["decode_tok_s"]
                          for s in STAGES}
                print(f"hf_local judge (batch {args.batch_size}): " + "; ".join(
                    f"{s}: prefill {rates[s]['prefill_tok_s']:.0f} tok/s, decode {rates[s]['decode_tok_s']:.1f} tok/s, "
                    f"tokens (prefill, decode, prompts) {tokens[s]}" for s in STAGES), file=sys.stderr)
            else:
                secs = time_stages(interp, records)
            rows.append((name, secs))
            print(f"{name}: " + ", ".join(f"{s} {secs[s]:.2f} s" for s in STAGES), file=sys.stderr)
    print(f"load average after: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    n = len(records)
    per = lambda s: 60 * n / max(s, 1e-9)  # noqa: E731
    print("features scored per minute (paper sizes; each column alone, and explain + each scorer):")
    print(f"{'backend':<17}" + "".join(f"{s:>12}" for s in STAGES) + "".join(f"{'+' + s:>14}" for s in STAGES[1:]))
    for name, secs in rows:
        print(f"{name:<17}" + "".join(f"{per(secs[s]):>12.1f}" for s in STAGES)
              + "".join(f"{per(secs['explain'] + secs[s]):>14.1f}" for s in STAGES[1:]))
        if name == "hf_local" and bounds:
            print(f"{'  bound (judge)':<17}" + "".join(f"{per(bounds[s]):>12.1f}" for s in STAGES)
                  + "".join(f"{per(bounds['explain'] + bounds[s]):>14.1f}" for s in STAGES[1:]))
    figures: dict = {"gemm_gflops": round(gemm_gflops(), 1), "n_features": n, "batch_size": args.batch_size}
    for name, secs in rows:
        figures.update({f"{name}_features_per_min_{s}": round(per(secs["explain"] + secs[s]), 2) for s in STAGES[1:]})
    if bounds:
        secs = dict(rows)["hf_local"]
        for s in STAGES[1:]:
            figures[f"hf_local_bound_per_min_{s}"] = round(per(bounds["explain"] + bounds[s]), 2)
            achieved = secs["explain"] + secs[s]
            figures[f"hf_local_efficiency_{s}"] = round((bounds["explain"] + bounds[s]) / achieved, 3)
        figures.update({f"hf_local_efficiency_{s}_alone": round(bounds[s] / secs[s], 3) for s in STAGES})
    print(json.dumps(figures))


def gemm_gflops(n: int = 4096, repeats: int = 3) -> float:
    """fp32 GFLOP/s of an n x n matmul on this machine (the figure timings are compared against)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9

if __name__ == "__main__":
    main()
