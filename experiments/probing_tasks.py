"""Build the offline probing tasks from the fixtures' text: JSONL files of {"text", "label"} for
``evaluate.py analysis=probing 'analysis.tasks=[...]'``.

    python experiments/probing_tasks.py ../shared/fixtures/text <out dir> [--per-class 300] [--seed 0]

Writes three tasks (labels from the source or from rules on the text, never from a model):

- ``corpus.jsonl``: which corpus a passage of about 500 characters comes from: ``openwebtext`` (the last 100 of
  ``openwebtext-1k.jsonl``'s documents, which the stand-in LM never trained on), ``lambada`` (``lambada_test.jsonl``)
  or ``shakespeare`` (``tinyshakespeare.txt``). Three classes.
- ``pronoun.jsonl``: whether a LAMBADA passage says more ``he/him/his/himself`` (``he``) or more
  ``she/her/hers/herself`` (``she``); passages with neither, or as many of each, are left out. The passage's
  majority, not the presence of one word: many passages hold both, which keeps the task from saturating.
- ``opening.jsonl``: whether an OpenWebText passage is the document's first 500 characters (``opening``) or 500
  characters from its middle (``middle``), over the 100 held-out documents and 400 of the training ones.

Each class is a seeded sample of at most ``--per-class`` passages, written in a seeded order.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

PASSAGE_CHARS = 500
HE = re.compile(r"\b(he|him|his|himself)\b", re.IGNORECASE)
SHE = re.compile(r"\b(she|her|hers|herself)\b", re.IGNORECASE)


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def cut(text: str, start: int = 0) -> str:
    """About ``PASSAGE_CHARS`` characters from ``start``, from a word boundary to a word boundary."""
    if start:
        start = text.find(" ", start) + 1
    piece = text[start: start + PASSAGE_CHARS]
    return piece.rsplit(" ", 1)[0] if len(piece) == PASSAGE_CHARS else piece


def passages(text: str) -> list[str]:
    """A document cut into consecutive passages of about ``PASSAGE_CHARS`` characters."""
    return [p for start in range(0, len(text) - PASSAGE_CHARS // 2, PASSAGE_CHARS) if (p := cut(text, start).strip())]


def corpus_task(owt: list[str], lambada: list[str], shakespeare: str) -> list[tuple[str, str]]:
    rows = [(p, "openwebtext") for doc in owt[900:] for p in passages(doc)]
    rows += [(cut(t).strip(), "lambada") for t in lambada]
    rows += [(p, "shakespeare") for p in passages(shakespeare)]
    return rows


def pronoun_task(lambada: list[str]) -> list[tuple[str, str]]:
    rows = []
    for text in lambada:
        he, she = len(HE.findall(text)), len(SHE.findall(text))
        if he != she:
            rows.append((text, "he" if he > she else "she"))
    return rows


def opening_task(owt: list[str]) -> list[tuple[str, str]]:
    rows = []
    for doc in owt[500:]:
        if len(doc) >= 3 * PASSAGE_CHARS:
            rows.append((cut(doc).strip(), "opening"))
            rows.append((cut(doc, len(doc) // 2).strip(), "middle"))
    return rows


def sample(rows: list[tuple[str, str]], per_class: int, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for label in sorted({label for _, label in rows}):
        of_class = [r for r in rows if r[1] == label and r[0]]
        out += rng.sample(of_class, min(per_class, len(of_class)))
    rng.shuffle(out)
    return out


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    counts = {label: sum(r[1] == label for r in rows) for label in sorted({r[1] for r in rows})}
    print(f"{path}: {len(rows)} texts {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text_dir", type=Path, help="the fixtures' text folder (../shared/fixtures/text)")
    parser.add_argument("out", type=Path, help="where the task files are written")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    owt = read_jsonl(args.text_dir / "openwebtext-1k.jsonl")
    lambada = read_jsonl(args.text_dir / "lambada_test.jsonl")
    shakespeare = (args.text_dir / "tinyshakespeare.txt").read_text()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    tasks = {"corpus": corpus_task(owt, lambada, shakespeare), "pronoun": pronoun_task(lambada),
             "opening": opening_task(owt)}
    for name, rows in tasks.items():
        write(args.out / f"{name}.jsonl", sample(rows, args.per_class, rng))


if __name__ == "__main__":
    main()
