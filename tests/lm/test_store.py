"""The token store: the same contexts as packing in memory, built once and reused, never read half-written, keyed
on what the tokens depend on; the held-out contexts drawn across documents, tokenized only as far as needed."""

import json

import numpy as np
import pytest
import torch
from conftest import WORDS, make_tokenizer, text_settings

import sae.lm.store as store
from sae.lm.session import LMSession
from sae.lm.text import load_documents, pack_contexts, split_heldout


def session(lm_dir, text, root, context_length=32, heldout_fraction=0.1) -> LMSession:
    return LMSession(str(lm_dir), text_settings(text, context_length, heldout_fraction), model_dtype="float32",
                     lm_batch_size=4, seed=0, token_store_dir=str(root))


def test_store_contexts_are_the_packed_training_documents_and_built_once(tiny_lm_dir, tiny_text, tmp_path, monkeypatch):
    first = session(tiny_lm_dir, tiny_text, tmp_path).train_contexts
    packed = pack_contexts(
        split_heldout(load_documents("files", str(tiny_text)), 0.1).train, first_tokenizer(tiny_lm_dir), 32
    )
    assert torch.equal(first[:], packed) and first.shape == packed.shape
    picks = torch.tensor([7, 0, len(packed) - 1, 7])
    assert torch.equal(first[picks], packed[picks]) and torch.equal(first[3:9], packed[3:9])
    assert torch.equal(first[:, 0], packed[:, 0])
    (directory,) = [p for p in tmp_path.iterdir()]
    index = json.loads((directory / store.INDEX).read_text())
    assert index["dtype"] == "uint16" and index["documents"] == 54 and not list(directory.glob("*.arrow"))
    monkeypatch.setattr(store, "build_store", lambda *a, **k: pytest.fail("the store was built twice"))
    again = session(tiny_lm_dir, tiny_text, tmp_path, context_length=16).train_contexts  # another length, same store
    assert torch.equal(again[:], pack_contexts(split_heldout(load_documents("files", str(tiny_text)), 0.1).train,
                                               first_tokenizer(tiny_lm_dir), 16))


def first_tokenizer(lm_dir):
    from sae.lm.model import load_tokenizer

    return load_tokenizer(str(lm_dir))


def test_token_dtype_widens_for_large_vocabularies():
    class Vocab:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    assert store.token_dtype(Vocab(65536)) == np.uint16 and store.token_dtype(Vocab(65537)) == np.uint32


def test_a_half_written_store_is_never_read(tiny_lm_dir, tiny_text, tmp_path, monkeypatch):
    real = store._write_stream

    def dies(*args):
        real(*args)
        raise KeyboardInterrupt  # a kill after the tokens, before the index

    monkeypatch.setattr(store, "_write_stream", dies)
    with pytest.raises(KeyboardInterrupt):
        session(tiny_lm_dir, tiny_text, tmp_path).train_contexts  # noqa: B018
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    monkeypatch.setattr(store, "_write_stream", real)
    assert len(session(tiny_lm_dir, tiny_text, tmp_path).train_contexts) > 0


def test_the_key_changes_with_the_data_the_split_and_the_tokenizer(tiny_lm_dir, tiny_text, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(tiny_text.read_text().replace("cat", "dog", 1))
    tok_dir = tmp_path / "tok"
    make_tokenizer(tok_dir)
    (tok_dir / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text().replace('"cat"', '"kitten"'))
    from transformers import AutoTokenizer

    def key(text=tiny_text, fraction=0.1, tokenizer=None):
        s = session(tiny_lm_dir, text, tmp_path / "store", heldout_fraction=fraction)
        material = {"format": store.FORMAT, "tokenizer": store.tokenizer_fingerprint(tokenizer or s.tokenizer),
                    "data": store.data_fingerprint(s.text, s.rows), "heldout_fraction": fraction}
        return store.store_key(material)

    base = key()
    changed = [key(text=other), key(fraction=0.2), key(tokenizer=AutoTokenizer.from_pretrained(tok_dir))]
    assert key() == base and base not in changed and len(set(changed)) == 3


@pytest.fixture
def skewed_text(tmp_path):
    """100 documents: 90 training ones of the first words, then 10 held out of the other words, the first of
    which is far longer than any evaluation needs."""
    train_words, heldout_words = WORDS[:10], WORDS[10:]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(train_words, 30)) for _ in range(90)]
    docs += [" ".join(rng.choice(heldout_words, 3000 if i == 0 else 40)) for i in range(10)]
    path = tmp_path / "skewed.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_heldout_contexts_are_drawn_across_documents_and_tokenized_as_far_as_needed(tiny_lm_dir, skewed_text, tmp_path,
                                                                                      monkeypatch):
    tokenized = []
    real = store.token_ids
    monkeypatch.setattr(store, "token_ids", lambda docs, tok: tokenized.append(len(docs)) or real(docs, tok))
    s = session(tiny_lm_dir, skewed_text, tmp_path / "store")
    tokenizer = s.tokenizer
    contexts = s.eval_contexts(8 * 32)
    assert contexts.shape == (8, 32)
    heldout_ids = {tokenizer.convert_tokens_to_ids(w) for w in WORDS[10:]} | {0}
    assert set(contexts.flatten().tolist()) <= heldout_ids  # only held-out documents
    assert int((contexts[:, 1:] == 0).sum()) >= 3  # several documents, not the first long one alone
    assert torch.equal(contexts, session(tiny_lm_dir, skewed_text, tmp_path / "store").eval_contexts(8 * 32))
    few = session(tiny_lm_dir, skewed_text, tmp_path / "store")
    monkeypatch.setattr(store, "HELDOUT_BATCH", 2)
    tokenized.clear()
    few.eval_contexts(32)
    assert sum(tokenized) < 10  # not every held-out document


def test_all_heldout_text_when_it_is_shorter_than_eval_tokens(tiny_lm_dir, tiny_text, tmp_path):
    docs = load_documents("files", str(tiny_text))
    everything = pack_contexts(split_heldout(docs, 0.1).heldout, first_tokenizer(tiny_lm_dir), 32)
    got = session(tiny_lm_dir, tiny_text, tmp_path).eval_contexts(10**6)
    assert got.shape == everything.shape  # every held-out token, in another document order


def test_several_tokenizing_processes_keep_the_document_order(tiny_lm_dir, tiny_text, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "DOCS_PER_PROC", 10)
    s = LMSession(str(tiny_lm_dir), text_settings(tiny_text), model_dtype="float32", lm_batch_size=4, seed=0,
                  token_store_dir=str(tmp_path), tokenize_procs=2)
    packed = pack_contexts(split_heldout(load_documents("files", str(tiny_text)), 0.1).train, s.tokenizer, 32)
    assert torch.equal(s.train_contexts[:], packed)
