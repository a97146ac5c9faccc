"""The LM session: the frozen model, its tokenizer, and the training and held-out contexts of one text.

Training, the end-of-run evaluation, ``evaluate.py`` and every study take a session instead of building their own
pipeline, so the model is loaded once and every consumer sees the same contexts, special ids and reader.
Everything is loaded lazily: the tokenizer and contexts when first asked for (cheap: no weights), the model when
first read from, onto the session's device.
"""

from __future__ import annotations

import itertools
import math
from functools import cached_property

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sae.errors import ConfigError
from sae.lm.hooks import HookPoint
from sae.lm.model import load_model, load_tokenizer
from sae.lm.reader import Batch, read_rows
from sae.lm.store import PackedContexts, heldout_contexts, open_or_build
from sae.lm.streaming import StreamedContexts, streamed_heldout
from sae.lm.text import load_rows, special_ids
from sae.lm.text_settings import TextSettings


class LMSession:
    """One frozen LM over one text: ``tokenizer``, ``special_ids``, ``train_contexts`` and ``heldout_contexts``
    (``[n, context_length]`` token ids), ``model``, and reading activations with ``read`` and ``sample``."""

    def __init__(
        self,
        model_name: str,
        text: TextSettings,
        *,
        model_dtype: str,
        lm_batch_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        token_store_dir: str | None = None,
        tokenize_procs: int | None = None,
    ):
        self.model_name, self.model_dtype, self.text = model_name, model_dtype, text
        self.device, self.lm_batch_size, self.seed = torch.device(device), lm_batch_size, seed
        self.token_store_dir, self.tokenize_procs = token_store_dir, tokenize_procs
        self._model: nn.Module | None = None
        self._eval: dict[int, torch.Tensor | None] = {}

    @classmethod
    def of_model(cls, model: nn.Module, special_ids: list[int], tokenizer: PreTrainedTokenizerBase | None = None,
                 train_contexts: torch.Tensor | None = None, heldout_contexts: torch.Tensor | None = None,
                 lm_batch_size: int = 32, seed: int = 0) -> LMSession:
        """A session around a model already in memory (a notebook's, a test's), with the contexts it is given."""
        context_length = (train_contexts if train_contexts is not None else heldout_contexts)
        text = TextSettings(
            "memory", "", "text", "train", context_length.shape[1] if context_length is not None else 0, 0.0
        )
        parameter = next(model.parameters())
        session = cls(getattr(model.config, "_name_or_path", ""), text, model_dtype=str(parameter.dtype).split(".")[-1],
                      lm_batch_size=lm_batch_size, seed=seed, device=parameter.device)
        session._model, session.__dict__["special_ids"] = model, list(special_ids)
        session.__dict__["train_contexts"], session.__dict__["_heldout"] = train_contexts, heldout_contexts
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
    def rows(self):
        """The text's rows: a memory-mapped dataset, or a streamed one (``data.streaming``)."""
        t = self.text
        return load_rows(t.source, t.path, t.split, t.text_column, t.streaming)

    @cached_property
    def train_contexts(self) -> PackedContexts:
        """``[n, context_length]`` training contexts cut on demand from the token store (``sae.lm.store``), which
        the first session over this tokenizer and text builds and later ones (``evaluate.py`` too) reuse."""
        if self.text.streaming:
            raise ConfigError("data.streaming=true reads contexts in stream order, not by index: this needs "
                              "data.streaming=false")
        store = open_or_build(self.text, self.rows, self.tokenizer, self.token_store_dir, self.tokenize_procs)
        return store.contexts(self.tokenizer, self.text.context_length)

    def streamed_contexts(self, rank: int = 0, world_size: int = 1) -> StreamedContexts:
        """This rank's training contexts in stream order (``data.streaming``), from the start of the stream."""
        return StreamedContexts(self.rows, self.text, self.tokenizer, rank, world_size)

    def prepare_text(self) -> None:
        """Load the text and cut its first context now (to find text problems before any heavy work); without
        streaming this opens, or first builds, the token store."""
        if self.text.streaming:
            self.streamed_contexts().take(1)
        else:
            self.train_contexts  # noqa: B018

    @property
    def model(self) -> nn.Module:
        """The causal LM in eval mode, gradients off, on ``device`` (loaded on first use)."""
        if self._model is None:
            self._model = load_model(self.model_name, self.model_dtype, self.device)
        return self._model

    def to(self, device: str | torch.device) -> LMSession:
        """Move the session (and the model, once loaded) to ``device``."""
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def eval_contexts(self, eval_tokens: int) -> torch.Tensor:
        """Held-out contexts, enough for ``eval_tokens`` tokens (fewer if the held-out text is shorter), drawn
        across the held-out documents and tokenized only as far as needed (``sae.lm.store.heldout_contexts``;
        streaming: ``sae.lm.streaming.streamed_heldout``); the same in every session over this text."""
        n = max(1, math.ceil(eval_tokens / self.text.context_length))
        if "_heldout" in self.__dict__:  # a session around contexts in memory
            heldout = self.__dict__["_heldout"]
        else:
            if n not in self._eval:
                draw = streamed_heldout if self.text.streaming else heldout_contexts
                self._eval[n] = draw(self.rows, self.text, self.tokenizer, n) if self.text.heldout_fraction else None
            heldout = self._eval[n]
        if heldout is None:
            raise ValueError("this session's text has no held-out documents (data.heldout_fraction is 0)")
        return heldout[:n]

    def read(self, hooks: list[HookPoint], contexts: torch.Tensor, desc: str | None = None) -> Batch:
        """Activations ``[n, width]`` (float32, on ``device``) at ``hooks`` over the ordinary-text positions of
        ``contexts``."""
        return read_rows(self.model, hooks, contexts, self.special_ids, self.lm_batch_size, desc)

    def sample(self, hooks: list[HookPoint], n: int, read=None) -> Batch:
        """About ``n`` training activations per hook, from an order of all the training contexts seeded apart from
        the training stream's (``sample_order``, the same in every process); ``read`` maps context indices to
        activations (default: a live forward), so a cache can serve it. Streaming: the first contexts of the
        stream, read live."""
        if self.text.streaming:  # the first contexts of the stream, read live
            stream = self.streamed_contexts()
            batches = (stream.take(self.lm_batch_size) for _ in itertools.count())
            read = lambda contexts: self.read(hooks, contexts)  # noqa: E731
        else:
            read = read or (lambda indices: self.read(hooks, self.train_contexts[indices]))
            batches = self.sample_order().split(self.lm_batch_size)
        chunks, rows = [], 0
        for indices in batches:
            chunks.append(read(indices))
            rows += len(next(iter(chunks[-1].values())))
            if rows >= n:
                break
        return {k: torch.cat([c[k] for c in chunks])[:n] for k in chunks[0]}

    def sample_order(self) -> torch.Tensor:
        """The order ``sample`` reads the training contexts in (so a cache can plan for it)."""
        return torch.randperm(len(self.train_contexts), generator=torch.Generator().manual_seed(self.seed + 1))
