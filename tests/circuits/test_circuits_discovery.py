"""Circuit discovery on a hand-built model whose answer is known: block 1 is the identity (its attention and MLP
write nothing), dictionary 0's feature A writes basis direction e_2 and dictionary 1's feature B reads e_2, every
other atom is another basis direction. So B at layer 1 equals A at layer 0 exactly: ablation and attribution must
both find A -> B and nothing else, with the same weight (the path is linear where B fires)."""

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tokenizer, run_cli, run_in_process, tiny_meta, tiny_model

from sae.circuits.circuits_study import _token_feature, settings_problems
from sae.circuits.contexts import HeldOut
from sae.circuits.discovery import CircuitProblem, Contexts, DiscoverySettings, Level, discover
from sae.circuits.faithfulness import circuit_scores
from sae.circuits.graph import GRAPH_SCHEMA, CircuitGraph, to_dot
from sae.circuits.targets import TokenTarget
from sae.dictionaries import build
from sae.io.saving import save_dictionary
from sae.lm.hooks import HookPoint
from sae.lm.splice import Replace, spliced_forward

A, B = 2, 0  # A: dictionary 0's feature writing e_2; B: dictionary 1's feature reading e_2
H0, H1 = HookPoint(0), HookPoint(1)
CHROMIUM = Path("/usr/bin/chromium")


def handbuilt_model(seed: int = 0):
    """The tiny 2-block GPT-NeoX with block 1 writing nothing (its output projections zero): resid 1 = resid 0."""
    model = tiny_model(layers=2, seed=seed)
    block = model.gpt_neox.layers[1]
    for p in (block.attention.dense.weight, block.attention.dense.bias, block.mlp.dense_4h_to_h.weight,
              block.mlp.dense_4h_to_h.bias):
        p.data.zero_()
    return model


def basis_dictionary(directions: list[int]):
    """A ReLU dictionary whose feature i reads and writes basis direction ``directions[i]``."""
    d = build("relu", 32, len(directions), l1_coeff=0.0)
    rows = torch.eye(32)[directions]
    with torch.no_grad():
        d.W_dec.copy_(rows), d.W_enc.copy_(rows), d.b_enc.zero_(), d.b_dec.zero_()
    return d


def handbuilt_dictionaries():
    """Dictionary 0: features on e_0..e_7 (A is e_2); dictionary 1: B on e_2, three others on e_8, e_9, e_10."""
    return basis_dictionary(list(range(8))), basis_dictionary([A, 8, 9, 10])


def settings(**changes) -> DiscoverySettings:
    values = dict(fan_in=3, methods=("ablation", "attribution"), candidates=None, topk_agreement=3, ig_steps=1,
                  error_nodes=True, min_effect=0.001, width=None, batch_rows=16, edge_sign="both")
    return DiscoverySettings(**{**values, **changes})


@pytest.fixture(scope="module")
def problem():
    model = handbuilt_model()
    d0, d1 = handbuilt_dictionaries()
    torch.manual_seed(0)
    ids = torch.randint(2, 23, (6, 12))
    ids[:, 0] = 0
    x = spliced_forward(model, ids, {}, [0], read=[H1]).activations[H1]
    b = d1.encode(x)[..., B]
    keep = b.max(1).values > 0
    assert keep.sum() >= 3, "the random model should make B fire in most contexts"
    contexts = Contexts(ids[keep], b[keep].argmax(1))
    return CircuitProblem(model, [0], [contexts], batch_rows=16), Level(H1, d1, "dictionary_l1", 1), \
        Level(H0, d0, "dictionary_l0", 0)


def _graph(problem, top) -> CircuitGraph:
    graph = CircuitGraph("layers.1.resid:0", "hand-built tiny model")
    graph.add_feature(H1.name, 1, B, top.name, activation=float(problem.activation(top, [B])[0]))
    return graph


@pytest.mark.parametrize("methods", [("ablation", "attribution"), ("attribution", "ablation")])
def test_both_methods_find_a_to_b_and_nothing_else(problem, methods):
    problem, top, below = problem
    graph = _graph(problem, top)
    reports = discover(problem, [top, below], B, settings(methods=methods), graph)
    features = {e.source for e in graph.edges if not e.source.endswith("error")}
    assert features == {f"layers.0.resid/{A}"}  # A -> B only, by both methods
    assert {e.method for e in graph.edges} == {"ablation", "attribution"}
    weights = {e.method: e.weight for e in graph.edges if e.source == f"layers.0.resid/{A}"}
    b_value = graph.nodes[f"layers.1.resid/{B}"].activation
    assert weights["ablation"] == pytest.approx(b_value, rel=1e-5)  # ablating A removes all of B
    assert weights["attribution"] == pytest.approx(weights["ablation"], rel=1e-5)
    assert all(abs(e.weight) < 1e-6 for e in graph.edges if e.source.endswith("error"))
    assert reports[0].ablated == reports[0].live > 1  # every live feature ablated exactly
    assert reports[0].topk_agree == [True]


def test_attribution_is_exact_on_a_linear_path(problem):
    """Every feature's attribution, plain and integrated, equals its exact ablation effect (B is linear in e_2 where
    it fires, and the path from nothing to x scales e_2 linearly)."""
    problem, top, below = problem
    exact, exact_error = problem.ablation(top, [B], below, torch.arange(8))
    for steps in (1, 4):
        scores, error = problem.attribution(top, [B], below, steps)
        assert torch.allclose(scores, exact, atol=1e-6) and torch.allclose(error, exact_error, atol=1e-6)
    assert exact[0, A] > 0 and (exact[0, torch.arange(8) != A] == 0).all()


def _inhibited(problem):
    """Dictionary 0 with a ninth feature C that reads e_2 (fires where A does) and writes (e_3 − e_2)/√2: ablating C
    adds to e_2, so it raises B: an inhibitory edge C -> B of weight −B/√2, planted beside A's excitatory one."""
    problem, top, _ = problem
    d0 = basis_dictionary(list(range(8)) + [A])
    with torch.no_grad():
        d0.W_dec[8] = (torch.eye(32)[3] - torch.eye(32)[A]) / 2 ** 0.5
    fresh = CircuitProblem(problem.model, [0], problem.contexts, batch_rows=16)  # codes are cached per hook
    return fresh, top, Level(H0, d0, "dictionary_l0", 0)


@pytest.mark.parametrize("edge_sign", ["both", "positive"])
def test_a_planted_inhibitory_edge_is_kept_with_both_signs_only(problem, edge_sign):
    problem, top, below = _inhibited(problem)
    graph = _graph(problem, top)
    discover(problem, [top, below], B, settings(methods=("ablation",), edge_sign=edge_sign), graph)
    weights = {e.source: e.weight for e in graph.edges if not e.source.endswith("error")}
    b_value = graph.nodes[f"layers.1.resid/{B}"].activation
    assert weights[f"layers.0.resid/{A}"] > 0
    if edge_sign == "both":
        assert weights["layers.0.resid/8"] == pytest.approx(-b_value / 2 ** 0.5, rel=1e-4)  # inhibitory, kept
        assert graph.nodes["layers.0.resid/8"].effect < 0
        assert "arrowhead=tee" in to_dot(graph).source  # drawn apart from the excitatory edges (red, a bar)
    else:
        assert "layers.0.resid/8" not in weights and set(weights) == {f"layers.0.resid/{A}"}


def test_integrated_gradients_are_complete_on_a_nonlinear_node():
    """On the untouched tiny model (block 1's attention and MLP between the hooks: a nonlinear path), the integrated
    gradients of a layer-1 feature over every layer-0 feature and the error sum to its value minus its value with
    the layer-0 activation at the path's start (the decoder bias) -- within 1% at 128 steps; the plain gradient
    (one step) misses by more, which shows the node is not linear."""
    torch.manual_seed(0)
    model = tiny_model(layers=2, seed=1)
    d0, d1 = build("relu", 32, 48, l1_coeff=0.0), build("relu", 32, 48, l1_coeff=0.0)
    ids = torch.randint(2, 23, (6, 10))
    ids[:, 0] = 0
    contexts = Contexts(ids, torch.full((6,), 9))
    problem = CircuitProblem(model, [0], [contexts], batch_rows=16)
    top, below = Level(H1, d1, "l1", 1), Level(H0, d0, "l0", 0)
    node = int(problem.activation(top, range(48)).argmax())
    start = d0.decode(torch.zeros(1, 48))[0].detach()
    gap = float(problem.mean_value(top, [node])[0] - problem.mean_value(top, [node], lambda b: {H0: Replace(start)})[0])
    assert abs(gap) > 1e-3
    misses = {}
    for steps in (1, 128):
        scores, error = problem.attribution(top, [node], below, steps)
        misses[steps] = abs(float(scores.sum() + error.sum()) - gap) / abs(gap)
    assert misses[128] < 0.01 < misses[1]


def test_candidates_prerank_by_attribution(problem):
    problem, top, below = problem
    graph = _graph(problem, top)
    reports = discover(problem, [top, below], B, settings(candidates=1), graph)
    assert reports[0].ablated == 1 and f"layers.0.resid/{A}" in graph.nodes


def test_faithfulness_full_is_one_and_empty_is_zero(problem):
    problem, top, below = problem
    baseline = {H0: torch.full((8,), 0.05)}
    everything = circuit_scores(problem, top, B, [below], {H0: list(range(8))}, baseline, random_circuits=0)
    nothing = circuit_scores(problem, top, B, [below], {}, baseline, random_circuits=0)
    assert everything["faithfulness"] == pytest.approx(1.0) and everything["circuit"] == pytest.approx(
        everything["full"]
    )
    assert nothing["faithfulness"] == pytest.approx(0.0) and nothing["completeness_left"] == pytest.approx(1.0)
    found = circuit_scores(problem, top, B, [below], {H0: [A]}, baseline, random_circuits=4, seed=0)
    assert found["faithfulness"] == pytest.approx(1.0) and found["completeness_left"] == pytest.approx(0.0, abs=1e-6)
    assert found["n_random"] == 4 and found["circuit_size"] == 1


def test_token_target_picks_the_live_feature_with_the_largest_direct_logit():
    model = handbuilt_model()
    _, d1 = handbuilt_dictionaries()
    level = Level(H1, d1, "d", 1)
    token = 5
    with torch.no_grad():  # feature 3 (dead) and then feature 1 write most towards the token's unembedding
        unembed = model.get_output_embeddings().weight
        unembed[token] = 0.0
        unembed[token, 10], unembed[token, 8] = 5.0, 3.0
    live = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    stats = HeldOut(torch.zeros(4), torch.arange(3), torch.zeros(3, 4), live, torch.zeros(1, 4, dtype=torch.long))
    index, record = _token_feature(SimpleNamespace(model=model, device="cpu"), level, stats, TokenTarget("x", token))
    assert index == 1 and record["rank_among_all"] == 1 and record["rank_among_live"] == 0


# ---------------------------------------------------------------------------------------------------- the study, as run


@pytest.fixture(scope="module")
def handbuilt_run(tmp_path_factory, tiny_text):
    """The hand-built model and its two dictionaries saved as a set (``run``), the layer-1 one alone (``lone``),
    and an IOI vocabulary of the tiny tokenizer's words."""
    root = tmp_path_factory.mktemp("circuits")
    make_tokenizer(root / "lm")
    handbuilt_model().save_pretrained(root / "lm")

    def meta(layer: int) -> dict:
        return tiny_meta(root / "lm", tiny_text, layer)

    d0, d1 = handbuilt_dictionaries()
    save_dictionary(d0, root / "run" / "l0", meta(0))
    save_dictionary(d1, root / "run" / "l1", meta(1))
    save_dictionary(d1, root / "lone" / "l1", meta(1))
    vocabulary = {
        "train_templates": ["the{A} and{B} sat on the {P} ,{B} ran to{A}"],
        "held_out_template": "it was{A} and{B} ,{B} sat under{A}",
        "train_names": [" cat", " dog", " mat", " log"],
        "held_out_names": [" red", " blue", " mat"],
        "places": ["mat", "log"],
        "objects": ["big", "small"],
    }
    (root / "vocabulary.json").write_text(json.dumps(vocabulary))
    return root


def _args(root, *extra):
    return ["analysis=circuits", f"run={root / 'run'}", f"out={root / 'out'}", "analysis.n_contexts=4",
            "analysis.ig_steps=2", "analysis.faithfulness.random_circuits=3", "device=cpu", *extra]


def _summary(out) -> list[dict]:
    with open(out / "circuits" / "summary.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot is absent: apt-get install graphviz (.ci/run does)"
)
def test_study_end_to_end(handbuilt_run):
    import graphviz
    jsonschema = pytest.importorskip("jsonschema")

    root, out = handbuilt_run, handbuilt_run / "out"
    proc = run_cli("evaluate.py", *_args(root, "target=layers.1.resid:0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out / "circuits" / "layers.1.resid_0"
    data = json.loads((folder / "graph.json").read_text())
    jsonschema.validate(data, GRAPH_SCHEMA)
    assert {e["source"] for e in data["edges"]} == {f"layers.0.resid/{A}", "layers.0.resid/error"}
    assert {n["id"] for n in data["nodes"]} == {"layers.1.resid/0", f"layers.0.resid/{A}", "layers.0.resid/error"}
    assert data["meta"]["scores"]["faithfulness"] == pytest.approx(1.0) and data["meta"]["contexts"]["contexts"] >= 1
    assert all(n["top_tokens"] for n in data["nodes"] if n["kind"] == "feature")
    svg = graphviz.Source((folder / "graph.dot").read_text()).pipe(format="svg").decode()  # DOT parses
    assert svg.count('class="node"') == 3
    row, = _summary(out)
    assert row["target"] == "layers.1.resid:0" and float(row["faithfulness"]) == pytest.approx(1.0)
    assert float(row["spearman_target"]) > 0.9 and row["model"] == "lm"
    if CHROMIUM.exists():
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={root / 'profile'}"]
        dom = subprocess.run(
            [str(CHROMIUM), *flags, "--dump-dom", (folder / "graph.html").as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert dom.count('class="node"') == 3 and dom.count('class="dashboard"') == 2
        assert len(re.findall(r'<a xlink:href="[^"]+"', dom)) == 3  # every node of the drawing is a link
        assert 'href="../../dashboard/dictionary_l0/2.html"' in dom

    proc = run_cli("evaluate.py", *_args(root, "task=ioi", f"task.vocabulary={root / 'vocabulary.json'}",
                                         "task.n_pairs=4", "target.task=logit_diff"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = json.loads((out / "circuits" / "task_logit_diff" / "graph.json").read_text())
    assert [n["kind"] for n in task["nodes"] if n["layer"] == 2] == ["output"] and task["meta"]["task"]["pairs"] == 4
    assert [r["folder"] for r in _summary(out)] == ["layers.1.resid_0", "task_logit_diff"]  # the earlier target kept


@pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot is absent: apt-get install graphviz (.ci/run does)"
)
def test_defaults_finish(handbuilt_run, tmp_path):
    """analysis=circuits as a new user runs it: only the target given, every analysis.* setting at its default (both
    methods, candidates bounded, edge_sign=both, 10 random circuits as the control)."""
    proc = run_in_process("evaluate.py", "analysis=circuits", f"run={handbuilt_run / 'run'}", f"out={tmp_path}",
                          "target=layers.1.resid:0", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, = _summary(tmp_path)
    assert float(row["faithfulness"]) == pytest.approx(1.0) and int(row["n_random"]) == 10


def _one_line(proc, message: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_bad_input_is_one_line(handbuilt_run, tmp_path):
    root = handbuilt_run
    cases = [(["target=layers.1.resid:4"], "target feature 4 is out of range"),
             ([f"run={root / 'lone'}", "target=layers.1.resid:0"], "no dictionary at layer 0"),
             (["target.token='cat dog'"], "is 2 tokens")]
    for i, (extra, message) in enumerate(cases):
        run = run_cli if i == 0 else run_in_process  # the real entry point once, the other cases in this process
        proc = run("evaluate.py", *_args(root, f"out={tmp_path / 'out'}", *extra))
        _one_line(proc, message)
        assert not (tmp_path / "out" / "circuits").exists()  # nothing written


def test_settings_problems(hydra_app):
    from conftest import compose_config

    from sae.evaluation.studies import settings_of

    def problems(*overrides):
        return settings_problems(settings_of(compose_config(["analysis=circuits", *overrides], "evaluate")))

    assert problems() == []
    bad = problems("analysis.methods=[guess]", "analysis.n_contexts=0", "analysis.depth=0",
                   "analysis.faithfulness.ablation=max", "analysis.edge_sign=negative")
    assert len(bad) == 4 and bad[0].startswith("analysis.methods=") and "analysis.edge_sign='negative'" in bad[0]
    assert "analysis.depth=0" in bad[2]
    assert problems("analysis.fan_in=0") == ["analysis.fan_in=0 must be an integer >= 1"]


def test_one_dictionary_per_hook():
    from sae.circuits.circuits_study import _by_hook
    from sae.errors import ConfigError

    entries = [SimpleNamespace(name=n, hook=HookPoint(layer)) for n, layer in (("l0", 0), ("l3", 3), ("l3_k4", 3))]
    with pytest.raises(ConfigError, match="share a hook; choose one per hook with analysis.dictionaries"):
        _by_hook(entries, None)
    assert {h: e.name for h, e in _by_hook(entries, ["l0", "l3"]).items()} == {
        "layers.0.resid": "l0",
        "layers.3.resid": "l3",
    }
    with pytest.raises(ConfigError, match=r"no dictionary named \['l9'\]"):
        _by_hook(entries, ["l0", "l9"])
