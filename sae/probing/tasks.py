"""Text classification tasks for probing: a JSONL file of ``{"text", "label"}`` lines, or a hub dataset by name
with SAEBench's preprocessing (its dataset ids, text and label columns and chosen classes).

Every problem with a task (a missing file, a malformed line, a missing label, one class, a text with no ordinary
token, a hub task that cannot be fetched) is one ``ConfigError`` line naming the task and the way out.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sae.errors import ConfigError


@dataclass
class Task:
    """Texts and their class labels (strings), in file order."""

    name: str
    texts: list[str]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def task_name(spec: str) -> str:
    """A task's name in the outputs: a file's stem, or the hub task's name."""
    return Path(spec).stem if spec.endswith(".jsonl") else spec


def check_classes(task: Task, where: str) -> None:
    """Raise unless the task has two or more classes, each with at least two texts (one to train, one to test)."""
    counts = Counter(task.labels)
    if len(counts) < 2:
        raise ConfigError(f"{where}: {len(task.texts)} texts but only one class ({next(iter(counts), 'none')!r}); "
                          "a probe needs texts of two or more labels")
    small = sorted(c for c, n in counts.items() if n < 2)
    if small:
        raise ConfigError(f"{where}: classes {small} have fewer than 2 texts; give each class at least 2 "
                          "(one to train on, one to test)")


def read_jsonl(path: Path) -> Task:
    """A task from ``{"text": str, "label": str | int | bool}`` lines (blank lines skipped)."""
    if not path.is_file():
        raise ConfigError(f"analysis.tasks: task file '{path}' does not exist; give a JSONL file of "
                          '{"text": ..., "label": ...} lines or a hub task name')
    texts, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not JSON ({err.msg}); each line must be "
                              '{"text": ..., "label": ...}') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f'{path}:{number}: no "text" string; each line must be {{"text": ..., "label": ...}}')
        if record.get("label") is None or isinstance(record["label"], (list, dict)):
            raise ConfigError(f'{path}:{number}: no "label" (a string, integer or boolean); each line must be '
                              '{"text": ..., "label": ...}')
        texts.append(record["text"])
        labels.append(str(record["label"]))
    task = Task(task_name(str(path)), texts, labels)
    check_classes(task, str(path))
    return task


def subsample(task: Task, per_class: int | None, seed: int) -> Task:
    """At most ``per_class`` texts of each class, a seeded sample kept in file order (``None``: all)."""
    if per_class is None:
        return task
    rng = random.Random(seed)
    keep: set[int] = set()
    for c in task.classes:
        rows = [i for i, label in enumerate(task.labels) if label == c]
        keep |= set(rng.sample(rows, min(per_class, len(rows))))
    rows = sorted(keep)
    return Task(task.name, [task.texts[i] for i in rows], [task.labels[i] for i in rows])


# -- hub tasks (SAEBench's datasets; sae_bench/sae_bench_utils/dataset_utils.py and dataset_info.py) ---------------
@dataclass
class HubTask:
    """A hub task: ``(text, label)`` pairs, given how many of each class are wanted, and its chosen classes."""

    rows: Callable[[int], Iterable[tuple]]
    classes: list[str]


def _rows(dataset: str, *args, split: str = "train", streaming: bool = False, **kwargs) -> Iterable[dict]:
    from datasets import load_dataset

    return load_dataset(dataset, *args, split=split, streaming=streaming, **kwargs)


def _by_column(dataset: str, text: str, label: str, classes: list[str]) -> HubTask:
    def rows(per_class: int) -> Iterable[tuple]:
        return ((r[text], str(r[label])) for r in _rows(dataset, streaming=True) if str(r[label]) in classes)

    return HubTask(rows, classes)


def _europarl(per_class: int) -> Iterable[tuple]:
    """A language's side of one of SAEBench's five language pairs."""
    pairs = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
    for language, pair in pairs.items():
        for n, r in enumerate(_rows("Helsinki-NLP/europarl", pair, streaming=True)):
            if n >= per_class:
                break
            yield r["translation"][language], language


def _github_code(per_class: int) -> Iterable[tuple]:
    """Code longer than 534 characters, its first 150 (a licence header, in SAEBench's "Neurons in a Haystack"
    rule) cut off."""
    rows = _rows("codeparrot/github-code", streaming=True, trust_remote_code=True, languages=GITHUB_LANGUAGES)
    return ((r["code"][150:], r["language"]) for r in rows if len(r["code"]) > 128 * 3 + 150)


GITHUB_LANGUAGES = ["C", "Python", "HTML", "Java", "PHP"]
HUB_TASKS: dict[str, HubTask] = {
    "bias_in_bios": _by_column("LabHC/bias_in_bios", "hard_text", "profession", ["0", "1", "2", "6", "9"]),
    "ag_news": _by_column("fancyzhx/ag_news", "text", "label", ["0", "1", "2", "3"]),
    "amazon_reviews": _by_column("canrager/amazon_reviews_mcauley_1and5", "text", "category",
                                 ["1", "2", "3", "5", "6"]),
    "europarl": HubTask(_europarl, ["en", "fr", "de", "es", "nl"]),
    "github-code": HubTask(_github_code, GITHUB_LANGUAGES),
}


def fetch_hub_task(name: str, per_class: int) -> Task:
    """Up to ``per_class`` texts of each of the hub task's chosen classes, in stream order; one line when the hub
    cannot be reached."""
    texts, labels, counts, hub = [], [], Counter(), HUB_TASKS[name]
    try:
        for text, label in hub.rows(per_class):
            if counts[label] < per_class:
                texts.append(text)
                labels.append(label)
                counts[label] += 1
            if all(counts[c] >= per_class for c in hub.classes):
                break
    except Exception as err:  # the datasets library raises many kinds offline: all mean "cannot fetch"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"analysis.tasks: hub task '{name}' cannot be fetched ({first}); offline, give a JSONL "
                          'file of {"text": ..., "label": ...} lines instead') from None
    task = Task(name, texts, labels)
    check_classes(task, f"hub task '{name}'")
    return task


def spec_problems(spec: str) -> list[str]:
    """What is wrong with one ``analysis.tasks`` entry, without reading a file's lines or the network."""
    if spec.endswith(".jsonl"):
        return [] if Path(spec).is_file() else [
            f"analysis.tasks: task file '{spec}' does not exist; give a JSONL file of "
            '{"text": ..., "label": ...} lines or a hub task name']
    if spec not in HUB_TASKS:
        return [f"analysis.tasks: '{spec}' is neither a .jsonl file nor a hub task; choose one of "
                f"{', '.join(HUB_TASKS)} or give a JSONL file"]
    return []


def load_task(spec: str, hub_per_class: int) -> Task:
    """The task ``spec`` names: a JSONL file or a hub task."""
    return read_jsonl(Path(spec)) if spec.endswith(".jsonl") else fetch_hub_task(spec, hub_per_class)
