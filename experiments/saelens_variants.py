"""The † rows of docs/results/saelens.md: our BatchTopK, Matryoshka, JumpReLU and Gated dictionaries at layer 3 of the
stand-in, MSE on the activation cache, then a 32,768-token ``kl`` fine-tune of each, all evaluated on the same
held-out tokens as the SAELens comparison. The page described the fine-tunes in words ("likewise ..."); this script
is that recipe as commands.

    python experiments/saelens_variants.py --root <dir>          # print the commands
    python experiments/saelens_variants.py --root <dir> --run    # run them in order (hours on a 2-core CPU)

Run from the project's root. ``--root`` holds ``act_cache/`` (written by the first MSE run, read by the others) and
the ``variants*/`` directories. The page's figures predate this script and were not re-run with it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

FIXTURES = "../shared/fixtures"
OFFLINE = [
    f"model.name_or_path={FIXTURES}/neox-owt-14m",
    "data=text_files",
    f"data.path={FIXTURES}/text/openwebtext-1k.jsonl",
    "hook.layer=3",
    "logger=csv",
    "data.eval_tokens=1024",
]
EVALUATE = [
    "eval_tokens=12288",
    "data.source=files",
    f"data.path={FIXTURES}/text/openwebtext-1k.jsonl",
    f"model.name_or_path={FIXTURES}/neox-owt-14m",
]
FINE_TUNE = [
    "objective=kl",
    "train.tokens=32768",
    "train.batch_size=512",
    "train.warmup_steps=5",
    "train.lr=0.001",
    "train.sparsity_warmup_frac=0",
]
JUMPRELU = ("0.003", "0.004", "0.008", "0.01")
GATED = ("0.2", "0.25", "0.32", "0.4")


def _set(key: str, values: tuple[str, ...]) -> str:
    entries = ", ".join(f"{{name: c{v}, sae: {{{key}: {v}}}}}" for v in values)
    return f"dictionaries=[{entries}]"


def commands(root: str) -> list[list[str]]:
    """Every command, in order: the MSE runs (one set per penalised variant), their evaluation, the fine-tunes and
    theirs."""
    train = [sys.executable, "train.py", *OFFLINE]
    mse = [*train, f"stream.cache_dir={root}/act_cache", "train.tokens=3967232"]
    ours = f"{root}/variants/ours"
    out = [
        [*mse, "sae=batchtopk", "sae.k=8", f"hydra.run.dir={ours}/batchtopk-k8"],
        [*mse, "sae=matryoshka", "sae.k=8", f"hydra.run.dir={ours}/matryoshka-k8"],
        [*mse, "sae=matryoshka", "sae.k=16", f"hydra.run.dir={ours}/matryoshka-k16"],
        [*mse, "sae=jumprelu", f"hydra.run.dir={ours}/jumprelu", _set("l0_coeff", JUMPRELU)],
        [*mse, "sae=gated", f"hydra.run.dir={ours}/gated", _set("l1_coeff", GATED)],
    ]
    fine_tunes = {
        "variants_ft": [
            ("batchtopk-k8-mse-kl", ["sae=batchtopk", "sae.k=8"], f"{ours}/batchtopk-k8"),
            ("matryoshka-k8-mse-kl", ["sae=matryoshka", "sae.k=8"], f"{ours}/matryoshka-k8"),
            *[(f"jumprelu-c{c}-mse-kl", ["sae=jumprelu", f"sae.l0_coeff={c}"], f"{ours}/jumprelu/c{c}")
              for c in JUMPRELU],
        ],
        "variants_ft2": [
            *[(f"gated-c{c}-mse-kl", ["sae=gated", f"sae.l1_coeff={c}"], f"{ours}/gated/c{c}")
              for c in ("0.2", "0.32")],
            ("matryoshka-k16-mse-kl", ["sae=matryoshka", "sae.k=16"], f"{ours}/matryoshka-k16"),
        ],
    }
    for group, runs in fine_tunes.items():
        for name, variant, start in runs:
            out.append([*train, *variant, *FINE_TUNE, f"train.init_from={start}",
                        f"hydra.run.dir={root}/{group}/ours/{name}"])
    extra = f"{root}/variants_extra/ours"
    jumprelu = ["sae=jumprelu", "sae.l0_coeff=0.0035"]
    out.append([*mse, *jumprelu, f"hydra.run.dir={extra}/jumprelu-c0.0035-mse"])
    out.append([*train, *jumprelu, *FINE_TUNE, f"train.init_from={extra}/jumprelu-c0.0035-mse",
                f"hydra.run.dir={extra}/jumprelu-c0.0035-mse-kl"])
    for group in ("variants", "variants_ft", "variants_ft2", "variants_extra"):
        out.append([sys.executable, "evaluate.py", f"run={root}/{group}", *EVALUATE, f"out={root}/{group}/eval"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="directory for the cache, the runs and their evaluations")
    parser.add_argument("--run", action="store_true", help="run the commands (default: print them)")
    args = parser.parse_args()
    for command in commands(args.root):
        print(shlex.join(command), flush=True)
        if args.run:
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
