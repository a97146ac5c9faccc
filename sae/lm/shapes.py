"""A GPT-NeoX of a real Pythia's exact shape with random weights, written offline: speed and memory at true scale.

Pythia's weights come from the hub; its *shape* does not need to. A model built here from Pythia-70M's or
Pythia-410M's published config (d_model, layers, heads, MLP width, the 50,304-token vocabulary, 25% rotary, parallel
residual, untied embeddings) costs what the real one costs in every forward, backward and byte of memory, so every
speed and memory figure at scale can be measured on a machine without the hub. Its outputs mean nothing: label every
figure from it "Pythia-70M shape, random weights: speed and memory only".

    python -m sae.lm.shapes pythia-70m <dir> [--tokenizer <dir or hub id>] [--seed 0]

writes ``config.json``, ``model.safetensors`` and the tokenizer's files to ``<dir>``, which then loads like any
model: ``python train.py model.name_or_path=<dir> ...``. Tests use :data:`SHAPES` ``["tiny"]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sae.errors import ConfigError

# Each shape's GPT-NeoX config fields, as published in EleutherAI/pythia-*-deduped's config.json.
_PYTHIA_COMMON: dict[str, Any] = {
    "vocab_size": 50304,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "attention_bias": True,
}
SHAPES: dict[str, dict[str, Any]] = {
    "pythia-70m": {**_PYTHIA_COMMON, "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
                   "intermediate_size": 2048},
    "pythia-160m": {**_PYTHIA_COMMON, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072},
    "pythia-410m": {**_PYTHIA_COMMON, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "intermediate_size": 4096},
    # for tests: Pythia's structure (and its vocabulary, so the real tokenizer fits) at a toy width
    "tiny": {**_PYTHIA_COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128},
}
LABEL = "{shape} shape, random weights: speed and memory only"


def shape_config(shape: str):
    """The ``GPTNeoXConfig`` of ``shape`` (a key of :data:`SHAPES`)."""
    from transformers import GPTNeoXConfig

    if shape not in SHAPES:
        raise ConfigError(f"unknown shape '{shape}'; choose one of {', '.join(SHAPES)}")
    return GPTNeoXConfig(**SHAPES[shape])


def build(shape: str, seed: int = 0):
    """A ``GPTNeoXForCausalLM`` of ``shape`` with random weights (the library's own initialisation), in eval mode."""
    import torch
    from transformers import GPTNeoXForCausalLM

    config = shape_config(shape)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval()


def write(shape: str, out: Path, tokenizer: str | None = None, seed: int = 0) -> Path:
    """Write a random-weight model of ``shape`` (and ``tokenizer``'s files, when given) to ``out``, atomically.

    ``out`` must not exist or be empty: an earlier model is never overwritten half-way.
    """
    from sae.io.atomic import staged_directory

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; give a new directory")
    tok = _load_tokenizer(tokenizer) if tokenizer else None
    model = build(shape, seed)
    with staged_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
    return out


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer {name}: cannot be loaded ({str(err).splitlines()[0]}); give a tokenizer "
                          f"directory (e.g. ../shared/fixtures/pythia-tokenizer) or a reachable hub id") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae.lm.shapes", description=__doc__.splitlines()[0])
    parser.add_argument("shape", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("out", type=Path, help="a new (or empty) directory to write the model to")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer directory or hub id whose files are written beside the model "
                             "(Pythia's: EleutherAI/pythia-70m-deduped, or ../shared/fixtures/pythia-tokenizer)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    args = parser.parse_args(argv)
    try:
        path = write(args.shape, args.out, args.tokenizer, args.seed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({LABEL.format(shape=args.shape)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
