"""Tasks as prompt pairs: the IOI generator (real Pythia tokenizer), pairs JSONL files, and their bad inputs."""

import json
import re
from collections import Counter

import pytest
from conftest import FIXTURES, make_tokenizer, needs_fixtures

from sae.circuits.tasks import (
    batches,
    build_task,
    check_template,
    encode,
    ioi_task,
    load_pairs,
    load_vocabulary,
    make_pair,
    render,
    sentence,
    write_pairs,
)
from sae.errors import ConfigError

IOI_VOCABULARY = FIXTURES / "neox-ioi-14m" / "ioi_vocabulary.json"
TEMPLATE = "When{A} and{B} went to the {P},{B} gave a {O} to{A}."


@pytest.fixture(scope="module")
def pythia():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "pythia-tokenizer")


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """The tests' word-level tokenizer: every word of conftest.WORDS is one token."""
    return make_tokenizer(tmp_path_factory.mktemp("words"))


def test_render_orders():
    assert render(TEMPLATE, "ABBA", " Mary", " John", "store", "drink") == \
        ("When Mary and John went to the store, John gave a drink to", " Mary")
    assert render(TEMPLATE, "BABA", " Mary", " John", "store", "drink") == \
        ("When John and Mary went to the store, John gave a drink to", " Mary")
    spaceless = "{A0} and{B} went to the {P}.{B} handed the {O} to{A}."
    assert (
        render(spaceless, "ABBA", " Mary", " John", "park", "ball")[0]
        == "Mary and John went to the park. John handed the ball to"
    )
    assert (
        render(spaceless, "BABA", " Mary", " John", "park", "ball")[0]
        == "John and Mary went to the park. John handed the ball to"
    )


def test_sentence_completes_the_prompt():
    """The training sentence is the pair's prompt, its answer and the tail, the tail's place/object filled in."""
    assert sentence(TEMPLATE, "BABA", " Mary", " John", "store", "drink") == \
        "When John and Mary went to the store, John gave a drink to Mary."
    tail = "{A0} and{B} met.{B} thanked{A} at the {P} for the {O}."
    assert sentence(tail, "ABBA", " Mary", " John", "park", "ball") == \
        "Mary and John met. John thanked Mary at the park for the ball."

@needs_fixtures
def test_fixture_names_are_single_tokens_with_a_leading_space(pythia):
    data = json.loads(IOI_VOCABULARY.read_text())
    for name in data["train_names"] + data["held_out_names"]:
        ids = encode(pythia, name)
        assert len(ids) == 1, name
        assert pythia.decode(ids) == name and name.startswith(" ")


@needs_fixtures
@pytest.mark.parametrize("vocabulary", [IOI_VOCABULARY, None], ids=["fixture", "default"])
def test_ioi_pairs(pythia, vocabulary):
    task = ioi_task(pythia, vocabulary, "train", n_pairs=120, seed=1)
    names = set(load_vocabulary(vocabulary, "train")[0].names)
    assert len(task.pairs) == 120 and Counter(p.order for p in task.pairs) == {"ABBA": 60, "BABA": 60}
    assert task.orders() == ["ABBA", "BABA"] and len(task.select("BABA")) == 60
    for p in task.pairs:
        io, subject, other = p.meta["io"], p.meta["subject"], p.meta["counterfactual_io"]
        assert {io, subject, other} <= names and len({io, subject, other}) == 3
        # the answer is the indirect object, one token, and the counterfactual's is the third name
        assert pythia.decode([p.base_answer]) == io and pythia.decode([p.counterfactual_answer]) == other
        # the subject is named twice and the indirect object once; the counterfactual swaps only the latter
        assert len(re.findall(rf"\b{subject.strip()}\b", p.base)) == 2
        assert len(re.findall(rf"\b{io.strip()}\b", p.base)) == 1
        assert p.counterfactual == re.sub(rf"\b{io.strip()}\b", other.strip(), p.base)
        # order: ABBA names the indirect object first
        first = min((p.base.find(n.strip()), n) for n in (io, subject))[1]
        assert first == (io if p.order == "ABBA" else subject)
        assert len(p.base_ids) == len(p.counterfactual_ids)
        assert p.base_ids[0] == pythia.bos_token_id and list(p.base_ids[1:]) == encode(pythia, p.base)
        assert not p.base.endswith(" ") and p.base.split()[-1] in {"to"}


@needs_fixtures
def test_length_filter_drops_and_counts(pythia):
    # " Lisa" is one token but "Lisa" (sentence-initial, the {A0} slot) is two: unequal lengths against "Tom"
    assert make_pair(pythia, "Lisa and John went.", "Tom and John went.", " Lisa", " Tom", where="t") is None
    task = ioi_task(pythia, IOI_VOCABULARY, "train", n_pairs=200, seed=0)
    assert task.dropped > 0 and task.summary()["dropped_unequal_length"] == task.dropped
    assert all(len(p.base_ids) == len(p.counterfactual_ids) for p in task.pairs)
    assert Counter(p.order for p in task.pairs) == {"ABBA": 100, "BABA": 100}


@needs_fixtures
def test_held_out_split(pythia):
    data = json.loads(IOI_VOCABULARY.read_text())
    task = ioi_task(pythia, IOI_VOCABULARY, "held_out", n_pairs=20)
    assert {p.meta["io"] for p in task.pairs} <= set(data["held_out_names"])
    assert {p.meta["template"] for p in task.pairs} == {0} and "decided to give it to" in task.pairs[0].base
    crossed = ioi_task(pythia, IOI_VOCABULARY, "held_out", n_pairs=40, templates="train")
    assert {p.meta["io"] for p in crossed.pairs} <= set(data["held_out_names"]) and len(
        {p.meta["template"] for p in crossed.pairs}
    ) > 1
    assert crossed.split == "held_out names, train templates"


def test_ioi_with_word_tokenizer(words, tmp_path):
    """No fixture needed: a vocabulary of the tests' words, same checks of answers and balance, seeded."""
    vocabulary = {"train_templates": ["then{A} and{B} sat on the {P} and{B} ran on{A}."],
                  "held_out_template": "the{A} and{B} ran on the {O} and{B} sat on{A}.",
                  "train_names": [" cat", " dog", " log", " mat"], "held_out_names": [" red", " blue", " big"],
                  "places": ["mat"], "objects": ["log"]}
    path = tmp_path / "v.json"
    path.write_text(json.dumps(vocabulary))
    task = ioi_task(words, path, "train", n_pairs=10, seed=3, prepend_bos=False)
    assert Counter(p.order for p in task.pairs) == {"ABBA": 5, "BABA": 5} and task.dropped == 0
    for p in task.pairs:
        assert words.decode([p.base_answer]) == p.meta["io"].strip()
        assert p.base_ids[-1] == words.convert_tokens_to_ids("on")
    again = ioi_task(words, path, "train", n_pairs=10, seed=3, prepend_bos=False)
    assert again.pairs == task.pairs
    assert ioi_task(words, path, "train", n_pairs=10, seed=4, prepend_bos=False).pairs != task.pairs


def test_pairs_round_trip(words, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"base": "the cat sat on the", "counterfactual": "the dog sat on the", "base_answer": "mat",
             "counterfactual_answer": "log", "order": "x"},
            {"base": "a big dog ran", "counterfactual": "a small dog ran", "base_answer": "quick",
             "counterfactual_answer": words.convert_tokens_to_ids("slow")}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_pairs(path, words)
    assert len(task.pairs) == 2 and task.dropped == 0 and task.orders() == ["x"]
    first = task.pairs[0]
    assert first.base_answer == words.convert_tokens_to_ids(
        "mat"
    ) and first.counterfactual_answer == words.convert_tokens_to_ids("log")
    assert first.base_ids[0] == words.bos_token_id and len(first.base_ids) == 6
    copy = tmp_path / "copy.jsonl"
    write_pairs(copy, task.pairs, words)
    assert load_pairs(copy, words).pairs == task.pairs
    assert build_task({"kind": "pairs", "path": str(copy)}, words).pairs == task.pairs


def _pairs_file(tmp_path, *records) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


GOOD = {"base": "the cat sat", "counterfactual": "the dog sat", "base_answer": "on", "counterfactual_answer": "under"}


@pytest.mark.parametrize("record, message", [
    ({**GOOD, "base_answer": "on the"}, r"bad\.jsonl:2: the answer 'on the' is 2 tokens"),
    ({**GOOD, "base": ""}, r":2: the base prompt is empty"),
    ({**GOOD, "counterfactual": "   "}, r":2: the counterfactual prompt is empty"),
    ({**GOOD, "counterfactual_answer": "on"}, r":2: base and counterfactual answers are the same token"),
    ({**GOOD, "base_answer": 10 ** 6}, r":2: answer token id 1000000 is outside the vocabulary"),
    ({k: v for k, v in GOOD.items() if k != "base"}, r":2: missing field\(s\) \['base'\]"),
    ("{not json", r":2: not JSON"),
])
def test_bad_pairs(words, tmp_path, record, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_pairs(_pairs_file(tmp_path, GOOD, record), words)
    assert "\n" not in str(info.value)


def test_unequal_pairs_are_counted(words, tmp_path):
    long = {**GOOD, "counterfactual": "the dog sat on the mat"}
    task = load_pairs(_pairs_file(tmp_path, GOOD, long, long), words)
    assert len(task.pairs) == 1 and task.dropped == 2
    with pytest.raises(ConfigError, match="no usable pair \\(2 dropped"):
        load_pairs(_pairs_file(tmp_path, long, long), words)
    with pytest.raises(ConfigError, match="is not a file"):
        load_pairs(tmp_path / "absent.jsonl", words)
    with pytest.raises(ConfigError, match="task.path"):
        build_task({"kind": "pairs", "path": None}, words)
    with pytest.raises(ConfigError, match="unknown task.kind"):
        build_task({"kind": "nope"}, words)


@pytest.mark.parametrize("template", ["{A} and{B} went.", "When{A} and{B} left,{B} waved at{B}.",
                                      "When{A} and{X} left,{B} waved at{A}.", "When{A} and{A} left,{B} waved at{A}."])
def test_bad_templates(template):
    with pytest.raises(ConfigError, match="template"):
        check_template(template, "v.json")


def test_bad_vocabulary(words, tmp_path):
    path = tmp_path / "v.json"
    base = {"train_templates": [TEMPLATE], "held_out_template": TEMPLATE, "train_names": [" cat", " dog", " mat"],
            "held_out_names": [" red", " blue", " big"], "places": ["mat"], "objects": ["log"]}
    path.write_text(json.dumps({**base, "train_names": [" cat", " dog", " cat dog"]}))
    with pytest.raises(ConfigError, match="name ' cat dog' is not one token"):
        ioi_task(words, path, "train", n_pairs=4)
    path.write_text(json.dumps({**base, "train_names": [" cat", " dog"]}))
    with pytest.raises(ConfigError, match="'train_names' must be a list of at least 3"):
        ioi_task(words, path, "train", n_pairs=4)
    with pytest.raises(ConfigError, match="task.split='test'"):
        ioi_task(words, path, "test", n_pairs=4)
    with pytest.raises(ConfigError, match="even number"):
        ioi_task(words, path, "train", n_pairs=5)
    with pytest.raises(ConfigError, match="is not a file"):
        ioi_task(words, tmp_path / "absent.json", "train", n_pairs=4)


def test_batches_group_by_length(words):
    pairs = [make_pair(words, b, c, "on", "under", where="t", prepend_bos=False)
             for b, c in [("the cat sat", "the dog sat"), ("a cat", "a dog"), ("the big cat sat", "the red dog sat"),
                          ("the mat", "the log")]]
    out = batches(pairs, batch_size=1)
    assert [tuple(b.base_ids.shape) for b in out] == [(1, 2), (1, 2), (1, 3), (1, 4)]
    grouped = batches(pairs, batch_size=8)
    assert [b.index.tolist() for b in grouped] == [[1, 3], [0], [2]]
    assert grouped[0].counterfactual_ids.tolist() == [
        list(pairs[1].counterfactual_ids),
        list(pairs[3].counterfactual_ids),
    ]
    assert grouped[0].base_answer.tolist() == [words.convert_tokens_to_ids("on")] * 2


@needs_fixtures
def test_task_configs(pythia, tmp_path, hydra_app):
    """conf/task/*.yaml composed through their typed schemas (sae.circuits.config) into the settings build_task
    takes."""
    import dataclasses

    from conftest import compose_config

    from sae.circuits.config import IoiTaskSettings
    from sae.evaluation.studies import settings_of

    def task(*overrides):
        return settings_of(compose_config(["run=x", *overrides], "evaluate"), "task")

    ioi = task("task=ioi", f"task.vocabulary={IOI_VOCABULARY}")
    assert isinstance(ioi, IoiTaskSettings) and ioi.n_pairs == 200 and ioi.templates is None
    built = build_task(ioi, pythia)
    assert len(built.pairs) == ioi.n_pairs and built.split == "train"
    assert len(build_task(dataclasses.replace(ioi, vocabulary=None, n_pairs=10), pythia).pairs) == 10  # packaged
    write_pairs(tmp_path / "p.jsonl", built.pairs[:5], pythia)
    assert build_task(task("task=pairs", f"task.path={tmp_path / 'p.jsonl'}"), pythia).pairs == built.pairs[:5]



def _mixed_text_script():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("ioi_mixed_text", ROOT / "experiments" / "ioi_mixed_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ioi_mixed_text_script(tmp_path, capsys):
    """experiments/ioi_mixed_text.py: IOI is about --fraction of the training characters, training names only, and
    the printed data.heldout_fraction holds out exactly the text's last documents; bad input is one line, exit 2."""
    from sae.lm.text import load_documents, split_heldout

    script = _mixed_text_script()
    text = tmp_path / "owt.jsonl"
    owt = [f"document {i} " + "words and more words. " * (5 + i % 7) for i in range(40)]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in owt))
    vocabulary = str(load_vocabulary(None, "train")[1])
    out = tmp_path / "mixed.jsonl"
    script.main(["--text", str(text), "--vocabulary", vocabulary, "--out", str(out), "--fraction", "0.4",
                 "--sentences", "3", "--heldout", "5"])
    fraction = float(re.search(r"data.heldout_fraction=([0-9.]+)", capsys.readouterr().out).group(1))
    split = split_heldout(load_documents("files", str(out)), fraction)
    assert split.heldout == owt[-5:]
    ioi = [d for d in split.train if not d.startswith("document ")]
    assert sorted(set(split.train) - set(ioi)) == sorted(owt[:-5])
    assert 0.4 <= sum(map(len, ioi)) / sum(map(len, split.train)) < 0.5
    train, held_out = (set(load_vocabulary(None, s)[0].names) for s in ("train", "held_out"))
    used = {" " + w.strip(".,") for d in ioi for w in d.split()}
    assert used & train and not used & (held_out - train)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--text", str(text), "--vocabulary", vocabulary, "--out", str(tmp_path / "x.jsonl"),
                     "--heldout", "40"])
    assert (
        exit_.value.code == 2 and capsys.readouterr().err.startswith("error: ") and not (tmp_path / "x.jsonl").exists()
    )
