"""``evaluate.py analysis=patching`` as a user runs it: a dictionary and baselines on IOI pairs made of the tiny
tokenizer's words, the outputs, stale results, and every bad input as one line with exit status 2."""

import csv
import json

import pytest
import torch
from conftest import WORDS, run_cli, run_in_process, tiny_meta

from sae.dictionaries import build
from sae.io.saving import save_dictionary

NAMES = [" cat", " dog", " mat", " log", " red", " blue"]


@pytest.fixture(scope="module")
def patching_run(tiny_lm_dir, tiny_text, tmp_path_factory):
    """A random ReLU dictionary at layers.1.resid of the tiny LM, and an IOI vocabulary of its words."""
    root = tmp_path_factory.mktemp("patching")
    torch.manual_seed(0)
    meta = tiny_meta(tiny_lm_dir, tiny_text)
    save_dictionary(build("relu", 32, 64, l1_coeff=0.0), root / "run" / "d", meta)
    vocabulary = {
        "train_templates": ["the{A} and{B} sat on the {P} ,{B} ran to{A}", "then{A} and{B} ran ,{B} sat on{A}"],
        "held_out_template": "it was{A} and{B} ,{B} sat under{A}",
        "train_names": NAMES[:4],
        "held_out_names": NAMES[2:],
        "places": ["mat", "log"],
        "objects": ["big", "small"],
    }
    (root / "vocabulary.json").write_text(json.dumps(vocabulary))
    assert all(w.strip() in WORDS for w in NAMES)
    return root


def _args(root, *extra, task=None):
    task = task or ["task=ioi", f"task.vocabulary={root / 'vocabulary.json'}", "task.n_pairs=8"]
    return [
        "analysis=patching",
        f"run={root / 'run'}",
        f"out={root / 'out'}",
        *task,
        "analysis.baselines=[pca,neurons]",
        "analysis.greedy.thresholds.n=3",
        "analysis.attribution.points=4",
        "baseline_tokens=512",
        "device=cpu",
        *extra,
    ]


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_study_end_to_end(patching_run):
    out = patching_run / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "patching_layers.0.resid.png").write_bytes(b"stale")  # an earlier run's hook
    (out / "plots" / "frontier.png").write_bytes(b"another study's")
    proc = run_cli("evaluate.py", *_args(patching_run, "analysis.orderings=[greedy,attribution]",
                                         "analysis.rankings=[signed,magnitude]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _rows(out / "patching" / "summary.csv")
    assert {(r["method"], r["ordering"], r["ranking"], r["order"]) for r in summary} == {
        (m, o, k, g) for m in ("d", "pca", "neurons") for o, k in (("greedy", ""), ("attribution", "signed"),
                                                                   ("attribution", "magnitude"))
        for g in ("all", "ABBA", "BABA")}
    assert all(r["hook"] == "layers.1.resid" and r["model"] for r in summary)
    curves = _rows(out / "patching" / "curves.csv")
    assert {r["method"] for r in curves} == {"d", "pca", "neurons"}
    neurons = [r for r in curves if r["method"] == "neurons" and r["ordering"] == "greedy" and r["order"] == "all"]
    assert float(neurons[0]["kl"]) == pytest.approx(0.0, abs=1e-6)  # an exact basis, every coordinate patched
    task = json.loads((out / "patching" / "task.json").read_text())
    assert task["tasks"][0]["pairs"] == 8 and task["tasks"][0]["pairs_ABBA"] == 4 and len(task["timings"]) == 3
    assert (out / "plots" / "patching_layers.1.resid.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "plots" / "patching_layers.0.resid.png").exists()  # stale result removed
    assert (out / "plots" / "frontier.png").read_bytes() == b"another study's"  # not this study's: kept
    assert "wrote" in proc.stdout


def test_defaults_finish(patching_run, tmp_path):
    """analysis=patching as a new user runs it: every analysis.* setting at its default (attribution ranked by signed
    effect, its random control, the four baselines; no greedy), on the tiny stand-in."""
    proc = run_in_process("evaluate.py", "analysis=patching", f"run={patching_run / 'run'}", f"out={tmp_path}",
                          "task=ioi", f"task.vocabulary={patching_run / 'vocabulary.json'}", "baseline_tokens=512",
                          "device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _rows(tmp_path / "patching" / "summary.csv")
    assert {(r["ordering"], r["ranking"]) for r in summary} == {("attribution", "signed"), ("random", "")}
    assert {r["method"] for r in summary} == {"d", "pca", "ica", "neurons", "random"}
    curves = _rows(tmp_path / "patching" / "curves.csv")
    assert "edit_per_changed_position" in curves[0] and "changed_positions" in curves[0]


def test_a_costly_run_says_so_at_the_start(patching_run, tmp_path, monkeypatch):
    """A run whose estimated forward passes exceed the threshold says so in one line before the work, naming the
    setting that bounds it (the threshold lowered here so that a tiny run crosses it)."""
    import sae.circuits.patching_study as study

    monkeypatch.setattr(study, "FORWARD_PASSES_NOTICE", 10)
    proc = run_in_process("evaluate.py", *_args(patching_run, f"out={tmp_path}", "analysis.baselines=[]",
                                                "analysis.orderings=[greedy]", "task.n_pairs=4"))
    notice = [line for line in proc.stderr.splitlines() if "forward passes estimated" in line]
    assert proc.returncode == 0 and len(notice) == 1 and "analysis.greedy.max_candidates" in notice[0], proc.stderr
    assert proc.stderr.splitlines().index(notice[0]) < 2  # at the start: only the task's line before it
    monkeypatch.setattr(study, "FORWARD_PASSES_NOTICE", 10 ** 9)
    proc = run_in_process("evaluate.py", *_args(patching_run, f"out={tmp_path}", "analysis.baselines=[]",
                                                "analysis.orderings=[greedy]", "task.n_pairs=4"))
    assert "forward passes estimated" not in proc.stderr


def test_held_out_split_and_hooks(patching_run, tmp_path):
    proc = run_cli("evaluate.py", *_args(patching_run, "task.split=held_out", "analysis.baselines=[]",
                                         "analysis.orderings=[attribution]", f"out={tmp_path}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "patching" / "task.json").read_text())["tasks"][0]["split"] == "held_out"
    assert {r["ordering"] for r in _rows(tmp_path / "patching" / "summary.csv")} == {"attribution"}


def _single_error(proc, message: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_bad_input_is_one_line(patching_run, tmp_path):
    root = patching_run
    multi = tmp_path / "pairs.jsonl"
    multi.write_text(json.dumps({"base": "the cat sat", "counterfactual": "the dog sat", "base_answer": " on under",
                                 "counterfactual_answer": " mat"}) + "\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (["task=nonsense"], "task/nonsense"),
        ({"task": ["task=pairs", f"task.path={multi}"]}, "is 2 tokens"),
        ([f"task.vocabulary={tmp_path / 'missing.json'}"], "is not a file"),
        ([f"run={tmp_path / 'empty'}"], "no dictionary under"),
        (["analysis.target_fraction=2", "analysis.baselines=[pcaa]"], "target_fraction=2.0 must be in (0, 1]"),
        (["analysis.hooks=[layers.2.resid]"], "no dictionary at ['layers.2.resid']"),
    ]
    for extra, message in cases:
        task = extra.pop("task") if isinstance(extra, dict) else None
        proc = run_in_process("evaluate.py", *_args(root, *(extra or []), f"out={tmp_path / 'out'}", task=task))
        _single_error(proc, message)
        assert not (tmp_path / "out" / "patching").exists()  # nothing written
    no_task = [a for a in _args(root, f"out={tmp_path / 'out'}") if not a.startswith("task")]
    _single_error(run_cli("evaluate.py", *no_task), "needs a task")  # the real entry point, in its own process


def test_wrong_types_are_one_line(patching_run, tmp_path):
    """A value of the wrong type in any study's settings or the task is one line naming the key, before anything
    runs (Hydra checks it against the typed schema): one case through a real process, the rest in this one."""
    root = patching_run
    _single_error(run_cli("evaluate.py", *_args(root, "task.n_pairs=abc")), "task.n_pairs=abc")  # the task group
    _single_error(run_cli("evaluate.py", "analysis=circuits", f"run={root / 'run'}", "analysis.depth=abc"),
                  "analysis.depth=abc: Value 'abc' of type 'str' could not be converted to Integer")  # analysis
    cases = [
        ("analysis=patching", "analysis.batch_size=abc"),
        ("analysis=patching", "analysis.greedy.max_candidates=many"),
        ("analysis=circuits", "analysis.depth=abc"),
        ("analysis=circuits", "analysis.faithfulness.random_circuits=1.5"),
        ("analysis=features", "analysis.settings.top_k=abc"),
        ("analysis=metrics", "analysis.baselines=pca"),
        ("analysis=residue", "analysis.share_frac=most"),
        ("analysis=patching", "analysis.nonsense=1"),
    ]
    for study, override in cases:
        proc = run_in_process("evaluate.py", study, f"run={root / 'run'}", f"out={tmp_path}", override)
        key = override.split("=")[0]
        _single_error(proc, key)
        assert not tmp_path.joinpath("patching").exists()


def test_greedy_layers_not_studied_is_an_error():
    """A typo in analysis.greedy.layers used to run no greedy at all, silently (the same ConfigError path as
    analysis.hooks' check above, so one line and exit 2; tested here without a CLI run)."""
    from sae.circuits.patching import CurveSettings
    from sae.circuits.patching_study import _check_greedy_layers
    from sae.errors import ConfigError

    greedy = CurveSettings(orderings=("greedy", "attribution"))
    with pytest.raises(ConfigError, match=r"analysis.greedy.layers: \['layers.2.resid'\] not among"):
        _check_greedy_layers(["layers.2.resid"], greedy, {"layers.1.resid"})
    _check_greedy_layers(["layers.2.resid"], CurveSettings(orderings=("attribution",)), {"layers.1.resid"})  # fine
    _check_greedy_layers(["layers.1.resid"], greedy, {"layers.1.resid"})
