"""The text settings, declared once: which text a session reads and how it is cut into contexts.

``sae.lm.session.LMSession`` takes them; training's ``data`` group schema (``sae.training.config.TextDataConfig``)
extends them with training's own keys, and ``evaluate.py``'s ``data.*`` overrides
(``sae.evaluation.config.DataOverrides``) are made from them, each field nullable. Light on purpose (no torch): the
command-line check imports it before anything heavy.
"""

from __future__ import annotations

from dataclasses import MISSING as MISSING_FIELD
from dataclasses import asdict, dataclass, fields

from sae.errors import ConfigError


@dataclass
class TextSettings:
    """Which text a session reads and how it is cut into contexts (the text part of the ``data`` group; its
    defaults are the group's YAML files')."""

    source: str
    """``files`` (local .txt, .jsonl or .parquet files) or ``hub`` (a Hugging Face dataset)."""
    path: str
    """A file or glob (``files``), or a hub dataset id (``hub``)."""
    text_column: str
    """The column holding the text."""
    split: str
    """The dataset split (hub datasets)."""
    context_length: int
    """Tokens per packed context, BOS included."""
    heldout_fraction: float
    """The fraction of documents held out for evaluation: the last ones (``sae.lm.text.heldout_start``), or one
    in every ``1/heldout_fraction`` when streaming (``sae.lm.streaming.is_heldout``)."""
    streaming: bool = False
    """Read the documents from a streamed dataset, in order, instead of the token store (``sae.lm.streaming``)."""

    @classmethod
    def from_record(cls, data) -> TextSettings:
        """The settings among ``data`` (a config's or ``sae.json``'s ``data``, which may hold other keys too; a
        setting with a default may be absent, as in records older than it)."""
        names = [f.name for f in fields(cls) if f.default is MISSING_FIELD]
        missing = [n for n in names if data.get(n) is None]
        if missing:
            raise ConfigError(f"the text settings lack {', '.join(missing)}: give them as data.<key>=... "
                              f"(a run records all of {', '.join(names)})")
        optional = {f.name: data[f.name] for f in fields(cls) if f.name not in names and data.get(f.name) is not None}
        return cls(**{n: data[n] for n in names}, **optional)

    def as_record(self) -> dict:
        return asdict(self)
