"""Documents, the held-out split and packed contexts."""

import json

import pytest
from conftest import FIXTURES, make_tokenizer, needs_fixtures

from sae.errors import ConfigError
from sae.lm.text import load_documents, load_rows, pack_contexts, special_ids, split_heldout


def test_heldout_is_the_last_tenth():
    docs = [f"doc {i}" for i in range(1000)]
    split = split_heldout(docs, 0.1)
    assert split.heldout == docs[900:] and split.train == docs[:900]


@needs_fixtures
def test_owt_heldout_is_the_100_documents_the_lm_never_saw():
    path = FIXTURES / "text" / "openwebtext-1k.jsonl"
    docs = load_documents("files", str(path))
    lines = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert split_heldout(docs, 0.1).heldout == lines[900:]


def test_pack_contexts_start_with_bos_and_keep_token_order(tmp_path):
    tok = make_tokenizer(tmp_path)
    docs = ["the cat sat on the mat", "a dog ran under a big log and then it was quick"]
    ctx = pack_contexts(docs, tok, context_length=6)
    assert ctx.shape[1] == 6 and (ctx[:, 0] == tok.bos_token_id).all()
    stream = [t for d in tok(docs, add_special_tokens=False)["input_ids"] for t in (*d, tok.eos_token_id)]
    assert ctx[:, 1:].flatten().tolist() == stream[: ctx[:, 1:].numel()]
    assert special_ids(tok) == [0]


def test_txt_files_split_into_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert len(load_documents("files", str(tmp_path / "*.txt"))) == 2


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "matches no file"),
    (lambda p: (p / "x.jsonl").write_text(json.dumps({"text": "  "}) + "\n"), "holds no text"),
    (lambda p: (p / "x.jsonl").write_text(json.dumps({"body": "hello"}) + "\n"), "line 1: no 'text' field"),
    (lambda p: (p / "x.csv").write_text("text\nhello\n"), "unsupported type"),
])
def test_bad_text_files(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_documents("files", str(tmp_path / "x.*"))


BROKEN_LINES = [
    ("{oops", "not JSON"),
    (json.dumps({"body": "a"}), "no 'text' field (its fields: body)"),
    (json.dumps({"text": 3}), "'text' is a number, not a string"),
    (json.dumps({"text": None}), "'text' is null, not a string"),
    (json.dumps(["a"]), "an array, not an object"),
]


@pytest.mark.parametrize("line,problem", BROKEN_LINES)
def test_a_broken_corpus_line_is_one_line_naming_file_and_line(tmp_path, line, problem):
    """Line 3 broken (after a good line and a blank one): the error names the file, the line number and the problem,
    streaming or not (instead of the JSON loader's traceback)."""
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + line + "\n" + json.dumps({"text": "also fine"}) + "\n")
    for streaming in (False, True):
        with pytest.raises(ConfigError) as caught:
            load_rows("files", str(path), "train", "text", streaming)
        message = str(caught.value)
        assert message.startswith(f"{path}, line 3: {problem}") and "\n" not in message


def test_a_broken_corpus_line_stops_training_in_one_line(tiny_lm_dir, tmp_path):
    """The real entry point: exit 2 and one line, before any model loads."""
    from conftest import run_cli, tiny_overrides

    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "the cat sat"}) + "\n" + json.dumps({"txt": "on the mat"}) + "\n")
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, path, tmp_path / "run"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and f"{path}, line 2: no 'text' field" in lines[0], proc.stderr


def test_too_little_text_for_a_context(tmp_path):
    with pytest.raises(ConfigError, match="fewer than one context"):
        pack_contexts(["the cat"], make_tokenizer(tmp_path), context_length=64)
