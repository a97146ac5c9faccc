"""Behaviours as prompt pairs: a base prompt, a counterfactual prompt, and the next token each should predict.

A task is what feature patching restores and what a circuit explains: patching the counterfactual's features into
the base run should move the prediction from the base answer to the counterfactual answer. Two sources:

- ``ioi``: indirect-object identification built from a vocabulary file (templates, single-token names, places,
  objects). The counterfactual keeps the template and the subject and replaces the indirect object by a third name,
  so the answer changes. Both name orders (ABBA: the indirect object named first; BABA: the subject first) are
  generated in equal numbers and reported apart.
- ``pairs``: a user's JSONL file, one pair a line.

Every pair is tokenized here, and a pair whose two prompts tokenize to different lengths is dropped and counted:
patching runs position by position, so the two runs must line up token for token.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from sae.errors import ConfigError

ORDERS = ("ABBA", "BABA")
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9]+)\}")
KNOWN = {"A", "B", "A0", "B0", "P", "O"}
DEFAULT_VOCABULARY = "ioi_vocabulary.json"  # shipped in this package
MAX_ATTEMPTS_PER_PAIR = 20  # candidate pairs drawn per kept pair before the length filter is declared hopeless


@dataclass(frozen=True)
class PromptPair:
    """One base/counterfactual pair, tokenized; both id lists have the same length."""

    base: str
    counterfactual: str
    base_ids: tuple[int, ...]
    counterfactual_ids: tuple[int, ...]
    base_answer: int
    counterfactual_answer: int
    order: str = ""  # ABBA | BABA for IOI; a user's own group name (or "") for pairs files
    meta: Mapping = field(default_factory=dict, compare=False)

    @property
    def length(self) -> int:
        return len(self.base_ids)


@dataclass(frozen=True)
class Task:
    """The kept pairs of a task, how many were dropped for unequal lengths, and where they came from."""

    name: str
    pairs: tuple[PromptPair, ...]
    dropped: int
    source: str
    split: str = ""

    def orders(self) -> list[str]:
        """The groups reported apart (in first-seen order), not counting the empty group."""
        return list(dict.fromkeys(p.order for p in self.pairs if p.order))

    def select(self, order: str = "all") -> list[PromptPair]:
        """The pairs of one order, or all of them for ``all``."""
        return list(self.pairs) if order == "all" else [p for p in self.pairs if p.order == order]

    def summary(self) -> dict:
        counts = Counter(p.order for p in self.pairs if p.order)
        return {"task": self.name, "source": self.source, "split": self.split, "pairs": len(self.pairs),
                "dropped_unequal_length": self.dropped, **{f"pairs_{k}": v for k, v in counts.items()}}


@dataclass(frozen=True)
class PairBatch:
    """Pairs of one length stacked for one forward pass each (no padding: the final position is the last)."""

    base_ids: torch.Tensor  # [b, T] long
    counterfactual_ids: torch.Tensor  # [b, T] long
    base_answer: torch.Tensor  # [b] long
    counterfactual_answer: torch.Tensor  # [b] long
    index: torch.Tensor  # [b] long: each row's position in the list it was batched from


def batches(pairs: Sequence[PromptPair], batch_size: int) -> list[PairBatch]:
    """Group ``pairs`` by token length and stack each group in batches of at most ``batch_size``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    by_length: dict[int, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_length.setdefault(pair.length, []).append(i)
    out = []
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), batch_size):
            chunk = [pairs[i] for i in rows[start:start + batch_size]]
            out.append(PairBatch(
                base_ids=torch.tensor([p.base_ids for p in chunk], dtype=torch.long),
                counterfactual_ids=torch.tensor([p.counterfactual_ids for p in chunk], dtype=torch.long),
                base_answer=torch.tensor([p.base_answer for p in chunk], dtype=torch.long),
                counterfactual_answer=torch.tensor([p.counterfactual_answer for p in chunk], dtype=torch.long),
                index=torch.tensor(rows[start:start + batch_size], dtype=torch.long)))
    return out


# ---------------------------------------------------------------------------------------------------- tokenizing


def _start_ids(tokenizer, prepend_bos: bool) -> list[int]:
    if not prepend_bos:
        return []
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ConfigError("task.prepend_bos=true but the tokenizer has neither a BOS nor an EOS token; set it to false")
    return [bos]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_id(tokenizer, answer, where: str) -> int:
    """The one token id of an answer given as text (must be one token) or as an id (must be in the vocabulary)."""
    if isinstance(answer, bool) or answer is None:
        raise ConfigError(f"{where}: the answer {answer!r} is neither a token id nor a string")
    if isinstance(answer, int):
        if not 0 <= answer < len(tokenizer):
            raise ConfigError(f"{where}: answer token id {answer} is outside the vocabulary [0, {len(tokenizer)})")
        return answer
    if not isinstance(answer, str) or not answer:
        raise ConfigError(f"{where}: the answer {answer!r} is empty or not a string; give one token's text or id")
    ids = encode(tokenizer, answer)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ConfigError(f"{where}: the answer {answer!r} is {len(ids)} tokens {pieces}, not one; "
                          "use a single-token answer (mind the leading space)")
    return ids[0]


def make_pair(tokenizer, base: str, counterfactual: str, base_answer, counterfactual_answer, *, where: str,
              order: str = "", prepend_bos: bool = True, meta: Mapping | None = None) -> PromptPair | None:
    """Tokenize one pair; None when its two prompts tokenize to different lengths (the caller counts it)."""
    for name, text in (("base", base), ("counterfactual", counterfactual)):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: the {name} prompt is empty or not a string")
    a, b = answer_id(tokenizer, base_answer, where), answer_id(tokenizer, counterfactual_answer, where)
    if a == b:
        raise ConfigError(f"{where}: base and counterfactual answers are the same token ({a}); "
                          "a pair must change the answer")
    start = _start_ids(tokenizer, prepend_bos)
    base_ids, cf_ids = start + encode(tokenizer, base), start + encode(tokenizer, counterfactual)
    if len(base_ids) != len(cf_ids):
        return None
    return PromptPair(base, counterfactual, tuple(base_ids), tuple(cf_ids), a, b, order, dict(meta or {}))


# ---------------------------------------------------------------------------------------------------- pairs files


def load_pairs(path: str | Path, tokenizer, prepend_bos: bool = True) -> Task:
    """A user's JSONL file: fields ``base``, ``counterfactual``, ``base_answer``, ``counterfactual_answer`` (text of
    one token, or its id) and optionally ``order`` (a group reported apart)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task.path '{path}' is not a file; give a JSONL file of prompt pairs")
    pairs, dropped = [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: a pair must be a JSON object")
        missing = [k for k in ("base", "counterfactual", "base_answer", "counterfactual_answer") if k not in record]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {missing}")
        pair = make_pair(tokenizer, record["base"], record["counterfactual"], record["base_answer"],
                         record["counterfactual_answer"], where=where, order=str(record.get("order", "")),
                         prepend_bos=prepend_bos)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise ConfigError(
            f"task.path '{path}' holds no usable pair ({dropped} dropped: prompts of unequal token length)"
        )
    return Task("pairs", tuple(pairs), dropped, str(path))


def write_pairs(path: str | Path, pairs: Sequence[PromptPair], tokenizer) -> None:
    """Pairs as the JSONL ``load_pairs`` reads, answers as token text (so the file is readable and editable)."""
    lines = [json.dumps({"base": p.base, "counterfactual": p.counterfactual,
                         "base_answer": tokenizer.decode([p.base_answer]),
                         "counterfactual_answer": tokenizer.decode([p.counterfactual_answer]),
                         **({"order": p.order} if p.order else {})}) for p in pairs]
    Path(path).write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------- IOI


@dataclass(frozen=True)
class Vocabulary:
    """The words of one split of an IOI vocabulary file."""

    templates: tuple[str, ...]
    names: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]


def _strings(data: Mapping, key: str, source: str, minimum: int = 1) -> tuple[str, ...]:
    value = data.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) < minimum or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"vocabulary '{source}': '{key}' must be a list of at least {minimum} non-empty string(s)")
    return tuple(value)


def check_template(template: str, source: str) -> None:
    """A template names the subject ({B}) and ends its prompt at the last {A}, the indirect object to predict."""
    names = PLACEHOLDER.findall(template)
    unknown = sorted(set(names) - KNOWN)
    if unknown:
        raise ConfigError(f"vocabulary '{source}': template {template!r} has unknown placeholder(s) {unknown}; "
                          f"use {sorted(KNOWN)}")
    people = [n for n in names if n in {"A", "B", "A0", "B0"}]
    first_two = {n[0] for n in people[:2]}
    if len(people) < 3 or people[-1] != "A" or first_two != {"A", "B"}:
        raise ConfigError(f"vocabulary '{source}': template {template!r} must name {{A}} and {{B}} (in either order) "
                          "before its last placeholder, a {A} (the answer), where the prompt ends")


def load_vocabulary(path: str | Path | None, split: str, template_split: str | None = None) -> tuple[Vocabulary, str]:
    """The names of ``split`` (train | held_out) and the templates of ``template_split`` (None: the same split) from a
    vocabulary JSON (path None: the packaged default). Crossing them separates unseen names from unseen templates."""
    template_split = split if template_split is None else template_split
    for key, value in (("split", split), ("templates", template_split)):
        if value not in ("train", "held_out"):
            raise ConfigError(f"task.{key}={value!r}; use train or held_out")
    if path is None:
        source = str(resources.files("sae.circuits") / DEFAULT_VOCABULARY)
    else:
        source = str(Path(path).expanduser())
        if not Path(source).is_file():
            raise ConfigError(f"task.vocabulary '{source}' is not a file; give an IOI vocabulary JSON")
    try:
        data = json.loads(Path(source).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"task.vocabulary '{source}' is not JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"task.vocabulary '{source}' must be a JSON object")
    key = "train_templates" if template_split == "train" else (
        "held_out_templates" if "held_out_templates" in data else "held_out_template")
    vocabulary = Vocabulary(templates=_strings(data, key, source), names=_strings(data, f"{split}_names", source, 3),
                            places=_strings(data, "places", source), objects=_strings(data, "objects", source))
    for template in vocabulary.templates:
        check_template(template, source)
    return vocabulary, source


def render(template: str, order: str, io: str, subject: str, place: str, obj: str) -> tuple[str, str]:
    """The prompt (the template cut before its last {A}) and the answer (the indirect object, with its space).

    BABA swaps the first two name placeholders of the template, each keeping its spacing ({A0} stays spaceless).
    """
    slots = [m for m in PLACEHOLDER.finditer(template)]
    people = [i for i, m in enumerate(slots) if m.group(1) in {"A", "B", "A0", "B0"}]
    letters = [m.group(1) for m in slots]
    if order == "BABA":
        i, j = people[0], people[1]
        swap = {"A": "B", "B": "A", "A0": "B0", "B0": "A0"}
        letters[i], letters[j] = swap[letters[i]], swap[letters[j]]
    elif order != "ABBA":
        raise ValueError(f"order {order!r}")
    words = {"A": io, "B": subject, "A0": io.lstrip(), "B0": subject.lstrip(), "P": place, "O": obj}
    out, cursor = [], 0
    last = people[-1]
    for k, (m, letter) in enumerate(zip(slots, letters)):
        out.append(template[cursor:m.start()])
        if k == last:
            return "".join(out), words[letter]
        out.append(words[letter])
        cursor = m.end()
    raise AssertionError("unreachable: check_template guarantees a last name slot")


def sentence(template: str, order: str, io: str, subject: str, place: str, obj: str) -> str:
    """The whole sentence (the prompt, its answer and the template's tail): IOI text to train dictionaries on, in
    the same words and orders the pairs are built from (``experiments/ioi_mixed_text.py``)."""
    prompt, answer = render(template, order, io, subject, place, obj)
    last = [m for m in PLACEHOLDER.finditer(template) if m.group(1) in {"A", "B", "A0", "B0"}][-1]
    words = {"P": place, "O": obj}
    tail = PLACEHOLDER.sub(lambda m: words[m.group(1)], template[last.end():])  # check_template: only {P}/{O} here
    return prompt + answer + tail


def _check_names(tokenizer, names: Sequence[str], source: str) -> None:
    for name in names:
        if len(encode(tokenizer, name)) != 1:
            raise ConfigError(f"vocabulary '{source}': name {name!r} is not one token for this tokenizer; "
                              "IOI names must be single tokens (with their leading space)")


def ioi_task(tokenizer, vocabulary: str | Path | None = None, split: str = "train", n_pairs: int = 200,
             seed: int = 0, prepend_bos: bool = True, templates: str | None = None) -> Task:
    """``n_pairs`` IOI pairs, half ABBA and half BABA, every kept pair's two prompts of equal token length.

    Candidates failing the length filter (e.g. a spaceless {A0} that is two tokens for one name and one for the
    other) are dropped, counted and replaced by fresh draws, so the two orders stay balanced.
    """
    if n_pairs < 2 or n_pairs % 2:
        raise ConfigError(f"task.n_pairs={n_pairs} must be an even number >= 2 (half ABBA, half BABA)")
    vocab, source = load_vocabulary(vocabulary, split, templates)
    _check_names(tokenizer, vocab.names, source)
    rng = random.Random(seed)
    pairs, dropped = [], 0
    for order in ORDERS:
        kept, attempts = 0, 0
        while kept < n_pairs // 2:
            attempts += 1
            if attempts > MAX_ATTEMPTS_PER_PAIR * n_pairs:
                raise ConfigError(f"vocabulary '{source}': only {kept} of {n_pairs // 2} {order} pairs tokenize to "
                                  f"equal lengths after {attempts - 1} draws; check its templates and names")
            t = rng.randrange(len(vocab.templates))
            io, subject, other = rng.sample(vocab.names, 3)
            place, obj = rng.choice(vocab.places), rng.choice(vocab.objects)
            base, answer = render(vocab.templates[t], order, io, subject, place, obj)
            cf, cf_answer = render(vocab.templates[t], order, other, subject, place, obj)
            meta = {"template": t, "io": io, "subject": subject, "counterfactual_io": other}
            pair = make_pair(tokenizer, base, cf, answer, cf_answer, where=f"IOI template {t}", order=order,
                             prepend_bos=prepend_bos, meta=meta)
            if pair is None:
                dropped += 1
                continue
            pairs.append(pair)
            kept += 1
    label = split if templates in (None, split) else f"{split} names, {templates} templates"
    return Task("ioi", tuple(pairs), dropped, source, label)


def build_task(task, tokenizer) -> Task:
    """The task a ``conf/task/*.yaml`` describes: its settings object (``sae.circuits.config.IoiTaskSettings`` or
    ``PairsTaskSettings``), or a mapping of the same keys."""
    get = task.get if isinstance(task, Mapping) else lambda key, default=None: getattr(task, key, default)
    kind = get("kind")
    prepend_bos = bool(get("prepend_bos", True))
    if kind == "ioi":
        return ioi_task(tokenizer, get("vocabulary"), str(get("split", "train")), int(get("n_pairs", 200)),
                        int(get("seed", 0)), prepend_bos, get("templates"))
    if kind == "pairs":
        if not get("path"):
            raise ConfigError("task=pairs needs task.path=<a JSONL file of prompt pairs>")
        return load_pairs(get("path"), tokenizer, prepend_bos)
    raise ConfigError(f"unknown task.kind {kind!r}; use task=ioi or task=pairs")
