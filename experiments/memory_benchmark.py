"""Peak memory of a short training run on a large corpus against the same run on the 1.2M-token fixture.

A benchmark, not a test: it writes a ~25M-token JSONL file by repeating the OpenWebText fixture (under a temporary
directory, never into the project), then runs ``train.py`` four times in fresh processes, each with its own token
store directory: the fixture and the large file, each first with an empty store (the run tokenizes) and then again
(the run must reuse the store). It prints one line per run and, last, one JSON object: each run's peak resident
memory (the training process's own, and the largest of its children's: the tokenizing processes), the ratio large /
fixture for first and for second runs, whether the second runs reused the store, and the first tokenization's
tokens per second (from the run's log line ``token store: tokenized ...``).

    python experiments/memory_benchmark.py            # from the project's root; ../shared/fixtures needed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
MODEL, TEXT = FIXTURES / "neox-owt-14m", FIXTURES / "text" / "openwebtext-1k.jsonl"
FIXTURE_TOKENS = 1_200_000  # about, with the Pythia tokenizer (fixtures README)

# Runs train.py in this process and, at exit, records this process's and its children's peak RSS (KiB on Linux).
MEASURE = """
import atexit, json, resource, runpy, sys
out, sys.argv = sys.argv[1], sys.argv[2:]
def record():
    with open(out, "w") as f:
        json.dump({"self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
atexit.register(record)
runpy.run_path(sys.argv[0], run_name="__main__")
"""

TOKENIZED = re.compile(r"token store: tokenized ([\d,]+) tokens in ([\d.]+) s \(([\d,]+) tokens/s\)")


def repeat_fixture(path: Path, tokens: int) -> int:
    """Write the fixture's documents again and again to ``path`` until about ``tokens`` tokens; the repeats."""
    lines = TEXT.read_text().splitlines()
    repeats = -(-tokens // FIXTURE_TOKENS)
    with open(path, "w") as out:
        for _ in range(repeats):
            out.write("\n".join(lines) + "\n")
    return repeats


def train_run(text: Path, store: Path, run_dir: Path, tokens: int, eval_tokens: int, extra: list[str]) -> dict:
    """One ``train.py`` run in a fresh process: its peak memory, and what its log says of the token store."""
    memory = run_dir.with_suffix(".memory.json")
    overrides = [f"model.name_or_path={MODEL}", "data=text_files", f"data.path={text}", f"data.token_store_dir={store}",
                 f"train.tokens={tokens}", f"data.eval_tokens={eval_tokens}", "logger=csv", f"hydra.run.dir={run_dir}",
                 *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(memory), str(ROOT / "train.py"), *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed on {text}: {proc.stderr[-2000:]}")
    log = proc.stdout + proc.stderr + "".join(p.read_text() for p in run_dir.glob("*.log"))
    peaks = json.loads(memory.read_text())
    found = TOKENIZED.search(log)
    return {
        "self_mib": peaks["self_kib"] / 1024,
        "children_mib": peaks["children_kib"] / 1024,
        "reused_store": "token store: reading" in log and found is None,
        "tokenized": None
        if found is None
        else {
            "tokens": int(found[1].replace(",", "")),
            "seconds": float(found[2]),
            "tokens_per_s": int(found[3].replace(",", "")),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-tokens", type=int, default=25_000_000, help="tokens of the repeated file (about)")
    parser.add_argument("--tokens", type=int, default=200_000, help="train.tokens of every run")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="data.eval_tokens of every run")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every run")
    args = parser.parse_args(argv)
    if not TEXT.is_file():
        raise SystemExit(f"{TEXT} is absent: this benchmark needs ../shared/fixtures")
    figures: dict = {"tokens": args.tokens, "eval_tokens": args.eval_tokens}
    with tempfile.TemporaryDirectory(prefix="sae-memory-") as tmp:
        tmp = Path(tmp)
        large = tmp / "owt-repeated.jsonl"
        figures["repeats"] = repeat_fixture(large, args.large_tokens)
        for name, text in (("fixture", TEXT), ("large", large)):
            for attempt in ("first", "second"):
                run = train_run(text, tmp / f"store-{name}", tmp / f"{name}-{attempt}", args.tokens, args.eval_tokens,
                                args.override)
                figures[f"{name}_{attempt}"] = run
                tokenized = run["tokenized"]
                print(
                    f"{name} ({attempt} run): peak RSS {run['self_mib']:,.0f} MiB (children {run['children_mib']:,.0f} "
                    f"MiB), "
                    + (
                        f"tokenized {tokenized['tokens']:,} tokens at {tokenized['tokens_per_s']:,} tokens/s"
                        if tokenized
                        else f"store reused: {run['reused_store']}"
                    ),
                    flush=True,
                )
    for attempt in ("first", "second"):
        figures[f"ratio_{attempt}"] = (
            figures[f"large_{attempt}"]["self_mib"] / figures[f"fixture_{attempt}"]["self_mib"]
        )
        print(f"{attempt} runs: large / fixture peak RSS = {figures[f'ratio_{attempt}']:.2f}x")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
