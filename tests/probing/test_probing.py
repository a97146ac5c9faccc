"""analysis=probing: the k-latent choice, the splits and the interval by hand; pooling over ordinary tokens; a
planted task the probes must solve through evaluate.py; SAEBench's sparse-probing schema; bad input."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, run_cli, run_in_process, tiny_overrides

from sae.probing.pooling import pool
from sae.probing.probe import DENSE, interval, ks_for, probe_accuracy, problems, top_k_by_mean_difference
from sae.probing.tasks import Task, subsample

SCHEMAS = Path(__file__).parents[1] / "schemas"  # SAEBench's eval-output schemas' structure, written here
SPARSE_PROBING_SCHEMA = SCHEMAS / "saebench_sparse_probing.schema.json"


def test_top_k_by_mean_difference_picks_the_columns_whose_class_means_differ_most():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = np.repeat([0, 1], 100)
    x[y == 1, 4] += 3.0  # the most informative
    x[y == 1, 1] -= 1.5  # the second (the rule uses the absolute difference)
    assert list(top_k_by_mean_difference(x, y, 2)) == [4, 1]
    assert len(top_k_by_mean_difference(x, y, 6)) == 6


def test_problems_are_balanced_disjoint_and_one_vs_rest():
    labels = ["a"] * 30 + ["b"] * 50 + ["c"] * 20
    split = problems(labels, 0.2, seed=1)
    assert [p.positive for p in split] == ["a", "b", "c"]
    for p in split:
        assert set(p.train).isdisjoint(p.test)
        assert p.train_y.sum() * 2 == len(p.train_y) and p.test_y.sum() * 2 == len(p.test_y)
        assert all(labels[i] == p.positive for i in p.train[p.train_y == 1])
        assert all(labels[i] != p.positive for i in p.train[p.train_y == 0])
    assert [p.positive for p in problems(["x"] * 5 + ["y"] * 5, 0.2, 0)] == ["y"]  # two classes: one problem
    (larger,) = problems(["x"] * 10 + ["y"] * 30, 0.2, 0)  # the positive class is the larger one: cut to balance
    assert larger.train_y.sum() * 2 == len(larger.train_y) == 2 * 8 and larger.test_y.sum() * 2 == len(larger.test_y)
    other = problems(labels, 0.2, seed=2)
    assert not np.array_equal(split[0].test, other[0].test)  # another seed, another split


def test_the_probe_finds_a_planted_latent_and_k_is_capped_by_the_width():
    rng = np.random.default_rng(0)
    y = np.repeat(["no", "yes"], 100).tolist()
    x = rng.normal(size=(200, 30))
    x[100:, 17] += 4.0
    problem = problems(y, 0.25, 0)[0]
    assert probe_accuracy(x, problem, 1, 1.0, 1000) > 0.95
    noise = np.delete(x, 17, axis=1)
    assert probe_accuracy(noise, problem, 1, 1.0, 1000) < 0.75
    assert ks_for(8, [1, 2, 5, 10, 20], True) == [1, 2, 5, DENSE]


def test_interval_is_the_student_t_interval():
    mean, low, high, sd = interval([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and sd == pytest.approx(0.1)
    assert high - mean == pytest.approx(4.302652729 * 0.1 / 3**0.5, rel=1e-6)  # t(0.975, 2 degrees of freedom)
    assert interval([0.7]) == (0.7, 0.7, 0.7, 0.0)


def test_pooling_leaves_out_special_positions():
    codes = torch.tensor([[[1.0, 0.0], [3.0, 5.0], [100.0, -100.0]]])
    keep = torch.tensor([[True, True, False]])
    assert torch.equal(pool(codes, keep, "mean"), torch.tensor([[2.0, 2.5]]))
    assert torch.equal(pool(codes, keep, "max"), torch.tensor([[3.0, 5.0]]))


def test_subsample_is_seeded_and_keeps_file_order():
    task = Task("t", [str(i) for i in range(20)], ["a"] * 10 + ["b"] * 10)
    a, b = subsample(task, 3, 0), subsample(task, 3, 0)
    assert a == b and len(a.texts) == 6 and a.texts == sorted(a.texts, key=int)


# -- through evaluate.py -------------------------------------------------------------------------------------------
def planted_task(path, n=80, seed=0):
    """Class "cat" texts hold the word cat three times, class "dog" texts the word dog, among random other words."""
    rng = random.Random(seed)
    others = [w for w in WORDS if w not in ("cat", "dog")]
    lines = []
    for i in range(n):
        label = "cat" if i % 2 else "dog"
        words = [rng.choice(others) for _ in range(rng.randint(6, 14))]
        for _ in range(3):
            words.insert(rng.randrange(len(words)), label)
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_lm_dir, tiny_text, tmp_path_factory):
    run = tmp_path_factory.mktemp("probing") / "run"
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, run), "sae=topk", "sae.k=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_probing_through_evaluate_writes_csv_plot_and_saebench_json(trained_run, tmp_path):
    import jsonschema

    task = planted_task(tmp_path / "animals.jsonl")
    out = tmp_path / "out"
    proc = run_cli("evaluate.py", f"run={trained_run}", f"out={out}", "analysis=probing", f"analysis.tasks=[{task}]",
                   "analysis.ks=[1,2]", "baseline_tokens=512", "analysis.seeds=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import csv

    rows = list(csv.DictReader((out / "probing.csv").open()))
    assert {"method", "hook", "task", "k", "accuracy", "ci_low", "ci_high"} <= set(rows[0])
    assert {r["method"] for r in rows} == {"dictionary", "pca", "ica", "neurons", "random", "raw"}
    assert {r["k"] for r in rows} == {"1", "2", "dense"} and {r["task"] for r in rows} == {"animals"}
    for r in rows:
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) and r["n_seeds"] == "3"
    raw_dense = next(r for r in rows if r["method"] == "raw" and r["k"] == "dense")
    assert float(raw_dense["accuracy"]) > 0.9  # the planted word is in the mean of the raw activations
    assert (out / "plots" / "probing.png").stat().st_size > 1000
    files = list((out / "saebench" / "sparse_probing").glob("*_eval_results.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    jsonschema.validate(result, json.loads(SPARSE_PROBING_SCHEMA.read_text()))
    assert result["eval_result_metrics"]["llm"]["llm_test_accuracy"] == pytest.approx(float(raw_dense["accuracy"]))
    splits = json.loads((out / "probing.json").read_text())["splits"]
    assert all(len(s["per_seed"]) == 3 for s in splits)


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_bad_tasks_are_one_line_and_write_nothing(trained_run, tmp_path):
    bad = {
        "one class": write_lines(tmp_path / "one.jsonl", [{"text": "the cat", "label": "a"}] * 4),
        "no \"label\"": write_lines(tmp_path / "nolabel.jsonl", [{"text": "the cat", "label": "a"}, {"text": "a dog"}]),
        "no ordinary token": write_lines(tmp_path / "empty.jsonl", [{"text": "the cat", "label": "a"},
                                                                    {"text": "a dog", "label": "a"},
                                                                    {"text": "", "label": "b"},
                                                                    {"text": "cat", "label": "b"}]),
        "not JSON": write_lines(tmp_path / "broken.jsonl", ['{"text": "the cat", "label": "a"', "{}"]),
        "does not exist": tmp_path / "missing.jsonl",
        "cannot be fetched": "ag_news",
        "neither a .jsonl file nor a hub task": "my_task",
    }
    for i, (problem, task) in enumerate(bad.items()):
        out = tmp_path / f"out{i}"
        run = run_cli if i == 0 else run_in_process  # the real entry point once, then in-process
        proc = run("evaluate.py", f"run={trained_run}", f"out={out}", "analysis=probing", f"analysis.tasks=[{task}]",
                   "baseline_tokens=512")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and problem in lines[-1], (problem, proc.stderr[-2000:])
        assert not out.exists() or not any(out.iterdir()), problem


def test_bad_settings_are_reported_together(trained_run, tmp_path):
    proc = run_in_process("evaluate.py", f"run={trained_run}", f"out={tmp_path / 'o'}", "analysis=probing",
                          "analysis.tasks=[]", "analysis.pooling=median", "analysis.test_fraction=1.5",
                          "analysis.seeds=0")
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2
    assert all(s in line for s in ("analysis.tasks is empty", "pooling=median", "test_fraction=1.5", "seeds=0"))
    typed = run_in_process("evaluate.py", f"run={trained_run}", "analysis=probing", "analysis.seeds=abc")
    assert typed.returncode != 0 and "seeds" in typed.stderr
