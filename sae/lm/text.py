"""Text for the activation pipeline: documents from files or the hub, a held-out split, and packed token contexts."""

from __future__ import annotations

import glob
import json
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
        raise ConfigError(
            f"data.path '{path}' has files of unsupported type {sorted(unknown)}; use .txt, .jsonl or .parquet"
        )
    builders = {BUILDERS[e] for e in exts}
    if len(builders) > 1:
        raise ConfigError(f"data.path '{path}' mixes file types {sorted(exts)}; point it at one type")
    return builders.pop(), files


def _json_type(value) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_jsonl(path: str, text_column: str) -> None:
    """One ConfigError naming the file, the line number and the problem at the first broken line of a JSONL file:
    a line that is not JSON, a record that is not an object or lacks ``text_column``, or a text that is not a
    string. Read line by line (memory does not grow with the file); blank lines are skipped, as the loader does."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"not JSON ({err.msg} at column {err.colno})"
            else:
                if not isinstance(record, dict):
                    problem = f"{_json_type(record)}, not an object with a '{text_column}' field"
                elif text_column not in record:
                    problem = f"no '{text_column}' field (its fields: {', '.join(record) or 'none'})"
                elif not isinstance(record[text_column], str):
                    problem = f"'{text_column}' is {_json_type(record[text_column])}, not a string"
                else:
                    continue
            raise ConfigError(f"{path}, line {number}: {problem}; fix or remove that line, or set data.text_column")


def load_rows(source: str, path: str, split: str, text_column: str = "text", streaming: bool = False):
    """The dataset's rows (a memory-mapped ``datasets.Dataset``, or an ``IterableDataset`` when ``streaming``):
    nothing is read into Python lists, so a corpus larger than memory can be tokenized and split by index."""
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = _load(source, path, split, streaming, text_column)
    finally:
        datasets.enable_progress_bars()
    if dataset.column_names is not None and text_column not in dataset.column_names:
        raise ConfigError(
            f"data.text_column '{text_column}' is not in {path} (columns: {', '.join(dataset.column_names)}); "
            "set data.text_column to one of them"
        )
    return dataset


def _load(source: str, path: str, split: str, streaming: bool, text_column: str):
    import datasets

    if source == "files":
        builder, files = _resolve_files(path)
        for name in files:
            if name.lower().endswith(".jsonl"):
                check_jsonl(name, text_column)
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    if source == "hub":
        try:
            if not hub_reachable():
                raise ConnectionError("no connection")
            return datasets.load_dataset(path, split=split, streaming=streaming)
        except Exception as err:  # the hub raises many types: connection, not found, offline mode
            raise ConfigError(
                f"cannot load dataset '{path}' from the hub ({type(err).__name__}); {OFFLINE_HINT}: "
                "data=text_files data.path=<a .txt/.jsonl/.parquet file>"
            ) from None
    raise ConfigError(f"unknown data.source '{source}'; use 'files' (data=text_files) or 'hub' (data=pile10k)")


def is_text(t) -> bool:
    """Whether a row's text is a document (empty and whitespace-only rows are skipped everywhere)."""
    return isinstance(t, str) and bool(t.strip())


def load_documents(source: str, path: str, text_column: str = "text", split: str = "train") -> list[str]:
    """Non-empty documents, in file order, as a list (for small texts: a benchmark's, a test's; training reads
    rows through ``sae.lm.store`` instead)."""
    dataset = load_rows(source, path, split, text_column)
    docs = [t for t in dataset[text_column] if is_text(t)]
    if not docs:
        raise ConfigError(f"data.path '{path}' holds no text in column '{text_column}'")
    return docs


def heldout_start(n_docs: int, heldout_fraction: float) -> int:
    """Where the held-out documents begin: the last ``heldout_fraction`` of ``n_docs`` (at least one when the
    fraction is positive) are held out, so a model trained on the first documents (the stand-in) never saw them."""
    if not 0 <= heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={heldout_fraction} must be in [0, 1)")
    n_heldout = round(n_docs * heldout_fraction)
    if heldout_fraction > 0:
        n_heldout = max(n_heldout, 1)
    if n_heldout >= n_docs:
        raise ConfigError(f"only {n_docs} document(s): nothing left to train on after holding out {n_heldout}")
    return n_docs - n_heldout


def split_heldout(docs: list[str], heldout_fraction: float) -> TextSplit:
    """Hold out the last ``heldout_fraction`` of the documents (``heldout_start``)."""
    start = heldout_start(len(docs), heldout_fraction)
    return TextSplit(train=docs[:start], heldout=docs[start:])


def special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids left out of training and splicing: BOS, EOS (the document separator) and padding."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def separators(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """``(bos, eos)``: the id each context starts with and the id that ends each document."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if bos is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start contexts with")
    return bos, eos


def token_ids(docs: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each document's token ids followed by EOS (the stream contexts are cut from)."""
    eos = separators(tokenizer)[1]
    # whole documents, packed and cut into contexts later: their length is not the model's input length, so the
    # tokenizer's "longer than the specified maximum sequence length" warning does not apply (verbose=False)
    return [[*doc, eos] for doc in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]]


def check_context_fits(n_tokens: int, context_length: int) -> int:
    """The number of whole contexts of ``context_length`` (BOS + ``context_length - 1`` text tokens) in
    ``n_tokens``; a ConfigError when none fits."""
    if context_length < 2:
        raise ConfigError(f"data.context_length={context_length} must be at least 2")
    n = n_tokens // (context_length - 1)
    if n == 0:
        raise ConfigError(f"the text has {n_tokens} tokens, fewer than one context of {context_length}")
    return n


def cut_contexts(stream: torch.Tensor, bos: int, context_length: int) -> torch.Tensor:
    """``[n, context_length]`` contexts from a 1-D token ``stream``: BOS, then the next ``context_length - 1``
    tokens; the tail that does not fill a whole context is dropped."""
    n, body = check_context_fits(len(stream), context_length), context_length - 1
    contexts = stream[: n * body].view(n, body).long()
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), contexts], dim=1)


def pack_contexts(docs: list[str], tokenizer: PreTrainedTokenizerBase, context_length: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, and cut into ``[n, context_length]`` contexts that each start with BOS."""
    stream = torch.tensor([t for doc in token_ids(docs, tokenizer) for t in doc], dtype=torch.long)
    return cut_contexts(stream, separators(tokenizer)[0], context_length)
