"""Text for the activation pipeline: documents from files or the hub, a held-out split, and packed token contexts."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sae.errors import ConfigError
from sae.lm.model import OFFLINE_HINT, hub_reachable

BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextSplit:
    """Documents for training and the held-out documents for evaluation (the last ``heldout_fraction``)."""

    train: list[str]
    heldout: list[str]


def _resolve_files(path: str) -> tuple[str, list[str]]:
    files = sorted(glob.glob(os.path.expanduser(path)))
    if not files:
        raise ConfigError(f"data.path '{path}' matches no file; give an existing .txt/.jsonl/.parquet file or glob")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    unknown = exts - set(BUILDERS)
    if unknown:
        raise ConfigError(f"data.path '{path}' has files of unsupported type {sorted(unknown)}; use .txt, .jsonl or .parquet")
    builders = {BUILDERS[e] for e in exts}
    if len(builders) > 1:
        raise ConfigError(f"data.path '{path}' mixes file types {sorted(exts)}; point it at one type")
    return builders.pop(), files


def _load_dataset(source: str, path: str, split: str):
    import datasets

    datasets.disable_progress_bars()
    if source == "files":
        builder, files = _resolve_files(path)
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    if source == "hub":
        try:
            if not hub_reachable():
                raise ConnectionError("no connection")
            return datasets.load_dataset(path, split=split)
        except Exception as err:  # the hub raises many types: connection, not found, offline mode
            raise ConfigError(
                f"cannot load dataset '{path}' from the hub ({type(err).__name__}); {OFFLINE_HINT}: "
                "data=text_files data.path=<a .txt/.jsonl/.parquet file>"
            ) from None
    raise ConfigError(f"unknown data.source '{source}'; use 'files' (data=text_files) or 'hub' (data=pile10k)")


def load_documents(source: str, path: str, text_column: str = "text", split: str = "train") -> list[str]:
    """Non-empty documents, in file order."""
    dataset = _load_dataset(source, path, split)
    if text_column not in dataset.column_names:
        raise ConfigError(
            f"data.text_column '{text_column}' is not in {path} (columns: {', '.join(dataset.column_names)}); "
            "set data.text_column to one of them"
        )
    docs = [t for t in dataset[text_column] if isinstance(t, str) and t.strip()]
    if not docs:
        raise ConfigError(f"data.path '{path}' holds no text in column '{text_column}'")
    return docs


def split_heldout(docs: list[str], heldout_fraction: float) -> TextSplit:
    """Hold out the last ``heldout_fraction`` of the documents (at least one when the fraction is positive)."""
    if not 0 <= heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={heldout_fraction} must be in [0, 1)")
    n_heldout = round(len(docs) * heldout_fraction)
    if heldout_fraction > 0:
        n_heldout = max(n_heldout, 1)
    if n_heldout >= len(docs):
        raise ConfigError(f"only {len(docs)} document(s): nothing left to train on after holding out {n_heldout}")
    return TextSplit(train=docs[: len(docs) - n_heldout], heldout=docs[len(docs) - n_heldout :])


def special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids left out of training and splicing: BOS, EOS (the document separator) and padding."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def pack_contexts(docs: list[str], tokenizer: PreTrainedTokenizerBase, context_length: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, and cut into ``[n, context_length]`` contexts that each start with BOS.

    The tail that does not fill a whole context is dropped.
    """
    if context_length < 2:
        raise ConfigError(f"data.context_length={context_length} must be at least 2")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if bos is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)
    body = context_length - 1
    n = len(stream) // body
    if n == 0:
        raise ConfigError(f"the text has {len(stream)} tokens, fewer than one context of {context_length}")
    contexts = stream[: n * body].view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), contexts], dim=1)
