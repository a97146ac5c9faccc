"""Training straight from a streamed dataset (local JSONL files, offline): the held-out documents, the contexts in
stream order split between ranks, an exact position, and a whole training run."""

import json

import pytest
import torch
from conftest import compose_config, text_settings, tiny_overrides

from sae.errors import ConfigError
from sae.lm.model import load_tokenizer
from sae.lm.session import LMSession
from sae.lm.streaming import is_heldout
from sae.lm.text import load_documents, pack_contexts


def streamed(lm_dir, text, context_length=32) -> LMSession:
    return LMSession(str(lm_dir), text_settings(text, context_length, streaming=True), model_dtype="float32",
                     lm_batch_size=4, seed=0)


def test_one_document_in_ten_is_held_out_evenly():
    held = [i for i in range(1000) if is_heldout(i, 0.1)]
    assert len(held) == 100 and held[:3] == [9, 19, 29]
    assert sum(is_heldout(i, 0.25) for i in range(1000)) == 250 and not any(is_heldout(i, 0.0) for i in range(100))


def test_streamed_contexts_pack_the_training_documents_in_order_and_split_by_rank(tiny_lm_dir, tiny_text):
    docs = load_documents("files", str(tiny_text))
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    train = [d for i, d in enumerate(docs) if not is_heldout(i, 0.1)]
    session = streamed(tiny_lm_dir, tiny_text)
    want = pack_contexts(train, tokenizer, 32)
    assert torch.equal(session.streamed_contexts().take(len(want)), want)
    for rank in range(2):
        mine = pack_contexts(train[rank::2], tokenizer, 32)
        assert torch.equal(session.streamed_contexts(rank, 2).take(5), mine[:5])
    heldout = pack_contexts([d for i, d in enumerate(docs) if is_heldout(i, 0.1)], tokenizer, 32)
    assert torch.equal(session.eval_contexts(3 * 32), heldout[:3])


def test_the_stream_position_restores_exactly_across_epochs(tiny_lm_dir, tiny_text):
    session = streamed(tiny_lm_dir, tiny_text)
    reference = session.streamed_contexts().take(200)  # about three epochs of this text
    for n in (1, 37, 75, 130):
        stream = session.streamed_contexts()
        stream.take(n)
        state = json.loads(json.dumps(stream.state_dict()))  # plain ints
        resumed = session.streamed_contexts()
        resumed.load_state_dict(state)
        assert torch.equal(resumed.take(20), reference[n : n + 20]), n


def test_a_training_run_from_a_stream(tiny_lm_dir, tiny_text, tmp_path):
    from sae.training.run import RunInfo, train

    metrics = train(compose_config(tiny_overrides(tiny_lm_dir, tiny_text, tmp_path, "data.streaming=true")),
                    RunInfo(tmp_path / "run", "run", None))
    assert metrics["n_tokens"] > 0 and json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    record = json.loads((tmp_path / "run" / "sae.json").read_text())
    assert record["data"]["streaming"] is True


def test_streaming_refuses_the_cache_in_one_line(tiny_lm_dir, tiny_text, tmp_path):
    from sae.training.run import RunInfo, train

    cfg = compose_config(tiny_overrides(tiny_lm_dir, tiny_text, tmp_path, "data.streaming=true",
                                        f"stream.cache_dir={tmp_path / 'cache'}"))
    with pytest.raises(ConfigError, match="stream.cache_dir caches contexts by index"):
        train(cfg, RunInfo(tmp_path / "run", "run", None))
