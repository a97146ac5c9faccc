"""Write a JSONL text of OpenWebText documents with IOI sentences mixed in, for dictionaries that see the behaviour
feature patching restores (docs/results/patching.md: the OpenWebText + IOI set).

    python experiments/ioi_mixed_text.py --text ../shared/fixtures/text/openwebtext-1k.jsonl \
        --vocabulary ../shared/fixtures/neox-ioi-14m/ioi_vocabulary.json --out outputs/owt_ioi.jsonl \
        [--fraction 0.3] [--sentences 20] [--heldout 100] [--seed 0]

The last ``--heldout`` documents of ``--text`` stay last, untouched, so that ``data.heldout_fraction`` (printed)
holds out exactly them: the held-out FVU is measured on OpenWebText alone. The other documents are shuffled with
IOI documents of ``--sentences`` sentences each, built from the vocabulary's *training* templates and names in both
orders (``sae.circuits.tasks.sentence``, the words the pairs use), until IOI is ``--fraction`` of the characters.
The held-out names and template never appear, so the held-out control stays a control.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae.circuits.tasks import ORDERS, load_vocabulary, sentence  # noqa: E402
from sae.errors import ConfigError, exit_on_config_error  # noqa: E402
from sae.io.atomic import write_text  # noqa: E402
from sae.lm.text import load_documents  # noqa: E402


def ioi_document(vocabulary, rng: random.Random, sentences: int) -> str:
    """``sentences`` IOI sentences (random template, names, place, object and order), one paragraph."""
    out = []
    for _ in range(sentences):
        io, subject = rng.sample(vocabulary.names, 2)
        out.append(sentence(rng.choice(vocabulary.templates), rng.choice(ORDERS), io, subject,
                            rng.choice(vocabulary.places), rng.choice(vocabulary.objects)))
    return " ".join(out)


def mixed_documents(docs: list[str], vocabulary, fraction: float, sentences: int, heldout: int,
                    seed: int) -> tuple[list[str], float]:
    """The mixed documents (held-out OpenWebText last) and the ``data.heldout_fraction`` that holds those out."""
    if not 0 < fraction < 1 or sentences < 1 or not 0 <= heldout < len(docs):
        raise ConfigError(f"need 0 < --fraction < 1, --sentences >= 1 and 0 <= --heldout < {len(docs)} documents "
                          f"(got {fraction}, {sentences}, {heldout})")
    rng = random.Random(seed)
    train, kept = docs[:len(docs) - heldout], docs[len(docs) - heldout:]
    target = fraction / (1 - fraction) * sum(len(d) for d in train)  # IOI characters for that share
    ioi, chars = [], 0
    while chars < target:
        ioi.append(ioi_document(vocabulary, rng, sentences))
        chars += len(ioi[-1])
    mixed = train + ioi
    rng.shuffle(mixed)
    return mixed + kept, heldout / (len(mixed) + heldout)


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="a .jsonl/.txt/.parquet text (field 'text')")
    parser.add_argument("--vocabulary", required=True, help="an IOI vocabulary JSON (its training split is used)")
    parser.add_argument("--out", required=True, help="the JSONL to write")
    parser.add_argument("--fraction", type=float, default=0.3, help="IOI's share of the training characters")
    parser.add_argument("--sentences", type=int, default=20, help="IOI sentences per document")
    parser.add_argument("--heldout", type=int, default=100, help="last documents of --text kept last, held out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.text).is_file():
        raise ConfigError(f"--text '{args.text}' is not a file")
    vocabulary, _ = load_vocabulary(args.vocabulary, "train")
    docs = load_documents("files", args.text, "text", "train")
    mixed, heldout_fraction = mixed_documents(docs, vocabulary, args.fraction, args.sentences, args.heldout, args.seed)
    write_text(Path(args.out), "".join(json.dumps({"text": d}) + "\n" for d in mixed))
    n_ioi = len(mixed) - len(docs)
    print(f"wrote {args.out}: {len(mixed)} documents ({n_ioi} IOI, {len(docs)} of {args.text}); train with "
          f"data.heldout_fraction={heldout_fraction:.6g} to hold out its last "
          f"{args.heldout} documents")


if __name__ == "__main__":
    main()
