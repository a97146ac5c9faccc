"""The LM session: the frozen model, its tokenizer, and the training and held-out contexts of one text.

Training, the end-of-run evaluation, ``evaluate.py`` and every study take a session instead of building their own
pipeline, so the model is loaded once and every consumer sees the same contexts, special ids and reader.
Everything is loaded lazily: the tokenizer and contexts when first asked for (cheap: no weights), the model when
first read from, onto the session's device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sae.errors import ConfigError
from sae.lm.hooks import HookPoint
from sae.lm.model import load_model, load_tokenizer
from sae.lm.reader import Batch, read_rows
from sae.lm.text import load_documents, pack_contexts, special_ids, split_heldout


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
    """The last fraction of documents, held out for evaluation."""

    @classmethod
    def from_record(cls, data) -> "TextSettings":
        """The settings among ``data`` (a config's or ``sae.json``'s ``data``, which may hold other keys too)."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if data.get(n) is None]
        if missing:
            raise ConfigError(f"the text settings lack {', '.join(missing)}: give them as data.<key>=... "
                              f"(a run records all of {', '.join(names)})")
        return cls(**{n: data[n] for n in names})

    def as_record(self) -> dict:
        return asdict(self)


class LMSession:
    """One frozen LM over one text: ``tokenizer``, ``special_ids``, ``train_contexts`` and ``heldout_contexts``
    (``[n, context_length]`` token ids), ``model``, and reading activations with ``read`` and ``sample``."""

    def __init__(self, model_name: str, text: TextSettings, *, model_dtype: str, lm_batch_size: int, seed: int,
                 device: str | torch.device = "cpu"):
        self.model_name, self.model_dtype, self.text = model_name, model_dtype, text
        self.device, self.lm_batch_size, self.seed = torch.device(device), lm_batch_size, seed
        self._model: nn.Module | None = None

    @classmethod
    def of_model(cls, model: nn.Module, special_ids: list[int], tokenizer: PreTrainedTokenizerBase | None = None,
                 train_contexts: torch.Tensor | None = None, heldout_contexts: torch.Tensor | None = None,
                 lm_batch_size: int = 32, seed: int = 0) -> "LMSession":
        """A session around a model already in memory (a notebook's, a test's), with the contexts it is given."""
        context_length = (train_contexts if train_contexts is not None else heldout_contexts)
        text = TextSettings("memory", "", "text", "train", context_length.shape[1] if context_length is not None else 0, 0.0)
        parameter = next(model.parameters())
        session = cls(getattr(model.config, "_name_or_path", ""), text, model_dtype=str(parameter.dtype).split(".")[-1],
                      lm_batch_size=lm_batch_size, seed=seed, device=parameter.device)
        session._model, session.__dict__["special_ids"] = model, list(special_ids)
        session.__dict__["_contexts"] = (train_contexts, heldout_contexts)
        if tokenizer is not None:
            session.__dict__["tokenizer"] = tokenizer
        return session

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.model_name)

    @cached_property
    def special_ids(self) -> list[int]:
        """BOS, EOS and padding: positions never trained on, spliced or scored as features."""
        return special_ids(self.tokenizer)

    @cached_property
    def _contexts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.text
        docs = split_heldout(load_documents(t.source, t.path, t.text_column, t.split), t.heldout_fraction)
        train = pack_contexts(docs.train, self.tokenizer, t.context_length)
        heldout = pack_contexts(docs.heldout, self.tokenizer, t.context_length) if docs.heldout else None
        return train, heldout

    @property
    def train_contexts(self) -> torch.Tensor:
        return self._contexts[0]

    @property
    def heldout_contexts(self) -> torch.Tensor | None:
        return self._contexts[1]

    def prepare_text(self) -> None:
        """Load, split and pack the text now (to find text problems before any heavy work)."""
        self._contexts  # noqa: B018

    @property
    def model(self) -> nn.Module:
        """The causal LM in eval mode, gradients off, on ``device`` (loaded on first use)."""
        if self._model is None:
            self._model = load_model(self.model_name, self.model_dtype, self.device)
        return self._model

    def to(self, device: str | torch.device) -> "LMSession":
        """Move the session (and the model, once loaded) to ``device``."""
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def eval_contexts(self, eval_tokens: int) -> torch.Tensor:
        """The first held-out contexts, enough for ``eval_tokens`` tokens."""
        if self.heldout_contexts is None:
            raise ValueError("this session's text has no held-out documents (data.heldout_fraction is 0)")
        return self.heldout_contexts[: max(1, math.ceil(eval_tokens / self.text.context_length))]

    def read(self, hooks: list[HookPoint], contexts: torch.Tensor, desc: str | None = None) -> Batch:
        """Activations ``[n, width]`` (float32, on ``device``) at ``hooks`` over the ordinary-text positions of
        ``contexts``."""
        return read_rows(self.model, hooks, contexts, self.special_ids, self.lm_batch_size, desc)

    def sample(self, hooks: list[HookPoint], n: int, read=None) -> Batch:
        """About ``n`` training activations per hook, from an order of all the training contexts seeded apart from
        the training stream's (the same in every process); ``read`` maps context indices to activations (default:
        a live forward), so a cache can serve it."""
        read = read or (lambda indices: self.read(hooks, self.train_contexts[indices]))
        order = torch.randperm(len(self.train_contexts), generator=torch.Generator().manual_seed(self.seed + 1))
        chunks, rows = [], 0
        for indices in order.split(self.lm_batch_size):
            chunks.append(read(indices))
            rows += len(next(iter(chunks[-1].values())))
            if rows >= n:
                break
        return {k: torch.cat([c[k] for c in chunks])[:n] for k in chunks[0]}
