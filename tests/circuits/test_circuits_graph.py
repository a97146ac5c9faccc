"""Circuit graphs: JSON against its schema, DOT through Graphviz, HTML with every node linked; the score arithmetic."""

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from sae.circuits.graph import (
    GRAPH_SCHEMA,
    CircuitGraph,
    Node,
    error_id,
    feature_id,
    html_page,
    read_json,
    write_all,
    write_html,
    write_json,
)
from sae.circuits.scores import (
    against_random,
    completeness_left,
    faithfulness,
    fraction_surviving,
    ranks,
    same_top_k,
    spearman,
    top_k,
)
from sae.errors import ConfigError

jsonschema = pytest.importorskip("jsonschema")
needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot is absent: apt-get install graphviz (.ci/run does)"
)
CHROMIUM = Path("/usr/bin/chromium")
ODD = ["back\\slash", "\n", "<b>&", 'say "hi"']  # tokens that must survive DOT quoting and HTML escaping


def sample_graph() -> CircuitGraph:
    """Target at layer 2, two layer-1 features and an error node, one layer-0 feature; both edge methods."""
    g = CircuitGraph("layers.2.resid:7", "stand-in model: neox-owt-14m (not Pythia)", meta={"fan_in": 2})
    g.add_feature("layers.2.resid", 2, 7, "dictionary_2", activation=3.5, effect=3.5, top_tokens=[")", "]"],
                  explanation="closes a parenthesis")
    g.add_feature("layers.1.resid", 1, 40, "dictionary_1", activation=1.25, effect=0.8, top_tokens=ODD)
    g.add_feature("layers.1.resid", 1, 3, "dictionary_1", activation=0.5, effect=-0.2)
    g.add_error("layers.1.resid", 1, "dictionary_1", activation=0.9, effect=0.1)
    g.add_feature("layers.0.resid", 0, 12, "dictionary_0", activation=2.0, effect=0.6, top_tokens=["("])
    target = feature_id("layers.2.resid", 7)
    for source, weight in ((feature_id("layers.1.resid", 40), 0.8), (feature_id("layers.1.resid", 3), -0.2),
                           (error_id("layers.1.resid"), 0.1)):
        g.add_edge(source, target, weight, "ablation")
    g.add_edge(feature_id("layers.1.resid", 40), target, 0.75, "attribution")
    g.add_edge(feature_id("layers.0.resid", 12), feature_id("layers.1.resid", 40), 0.6, "ablation")
    return g


def test_json_schema_and_round_trip(tmp_path):
    graph = sample_graph()
    write_json(graph, tmp_path / "graph.json")
    data = json.loads((tmp_path / "graph.json").read_text())
    jsonschema.validate(data, GRAPH_SCHEMA)
    assert [n["id"] for n in data["nodes"]][0] == "layers.0.resid/12" and len(data["edges"]) == 5
    back = read_json(tmp_path / "graph.json")
    assert back.to_dict() == graph.to_dict() and back.nodes["layers.1.resid/40"].top_tokens == ODD
    bad = json.loads(json.dumps(data))
    bad["nodes"][0]["kind"] = "bogus"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, GRAPH_SCHEMA)
    bad["nodes"][0].update(kind="feature", index=-1)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, GRAPH_SCHEMA)
    with pytest.raises(ConfigError, match="not a circuit graph"):
        CircuitGraph.from_dict({"nodes": []})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read circuit graph"):
        read_json(tmp_path / "broken.json")


def test_graph_invariants():
    graph = sample_graph()
    again = graph.add_feature("layers.1.resid", 1, 40, "dictionary_1", activation=99.0)
    assert again.activation == 1.25 and len(graph.nodes) == 5  # one node per feature, whatever the path to it
    with pytest.raises(ValueError, match="not a node"):
        graph.add_edge("layers.1.resid/999", "layers.2.resid/7", 1.0, "ablation")
    with pytest.raises(ValueError, match="edge method"):
        graph.add_edge("layers.1.resid/3", "layers.2.resid/7", 1.0, "guess")
    with pytest.raises(ValueError):
        graph.add_node(Node("x", "error", 1, "h", index=3))
    assert graph.attach_explanations({("dictionary_1", 3): "the letter a", ("dictionary_1", 999): "unused"}) == 1
    assert graph.nodes["layers.1.resid/3"].explanation == "the letter a"


@needs_dot
def test_dot_parses_through_graphviz(tmp_path):
    import graphviz

    graph = sample_graph()
    paths = write_all(graph, tmp_path / "circuits" / "t")
    assert [p.name for p in paths] == ["graph.json", "graph.dot", "graph.svg", "graph.html"]
    source = (tmp_path / "circuits" / "t" / "graph.dot").read_text()
    svg = graphviz.Source(source).pipe(format="svg").decode()  # raises if dot cannot parse the file
    assert svg.count('class="node"') == len(graph.nodes) and svg.count('class="edge"') == len(graph.edges)
    # the first three top tokens are drawn as text: a backslash (shown escaped, as repr does), a newline, markup
    assert "back\\\\\\\\slash" in source and "back\\\\slash" in svg and "&lt;b&gt;&amp;" in svg
    assert (
        'xlink:href="../../dashboard/dictionary_1/40.html"' in (tmp_path / "circuits" / "t" / "graph.svg").read_text()
    )
    assert "rankdir=BT" in source and source.count("rank=same") == 3


class Links(HTMLParser):
    """Rows of the nodes table (with their dashboard links) and the links of the inline drawing's nodes."""

    def __init__(self):
        super().__init__()
        self.rows, self.row, self.svg_links, self.in_node = {}, None, [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-node" in attrs:
            self.row = attrs["data-node"]
            self.rows[self.row] = {"anchor": attrs["id"], "dashboard": None}
        if tag == "a" and self.row and attrs.get("class") == "dashboard":
            self.rows[self.row]["dashboard"] = attrs["href"]
        if tag == "g" and attrs.get("class") == "node":
            self.in_node = 1
        if tag == "a" and self.in_node and "xlink:href" in attrs:
            self.svg_links.append(attrs["xlink:href"])
            self.in_node = 0

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None


def _dashboard(root: Path, graph: CircuitGraph) -> None:
    for node in graph.nodes.values():
        if node.kind == "feature" and node.index != 3:  # feature 3's page is left unbuilt
            page = root / "dashboard" / node.method / f"{node.index}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text("<html><body>feature page</body></html>")


@needs_dot
def test_html_links_every_node(tmp_path):
    graph = sample_graph()
    _dashboard(tmp_path, graph)
    write_html(graph, tmp_path / "circuits" / "t" / "graph.html")
    text = (tmp_path / "circuits" / "t" / "graph.html").read_text()
    parser = Links()
    parser.feed(text)
    assert set(parser.rows) == set(graph.nodes)
    anchors = {r["anchor"] for r in parser.rows.values()}
    for node_id, row in parser.rows.items():
        node = graph.nodes[node_id]
        if node.kind == "feature":
            assert row["dashboard"] == f"../../dashboard/{node.method}/{node.index}.html"
        else:
            assert row["dashboard"] is None
    assert len(parser.svg_links) == len(graph.nodes)  # every node of the drawing is a link
    for link in parser.svg_links:
        assert link.startswith("../../dashboard/") or link[1:] in anchors
        if link.startswith("../"):
            target = (tmp_path / "circuits" / "t" / link).resolve()
            assert target.is_file() or link.endswith("/3.html")
    assert text.count("page not built") == 1 and "closes a parenthesis" in text and "stand-in model" in text
    assert "&lt;b&gt;&amp;" in text and "<b>&" not in text


def test_html_without_a_drawing():
    page = html_page(sample_graph(), None)
    assert "no drawing" in page and page.count("class='dashboard'") == 4


@needs_dot
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install chromium (.ci/run does)"
)
def test_html_in_chromium(tmp_path):
    graph = sample_graph()
    _dashboard(tmp_path, graph)
    page = tmp_path / "circuits" / "t" / "graph.html"
    write_html(graph, page)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    proc = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count('class="dashboard"') == 4 and dom.count('class="node"') == len(graph.nodes)
    assert len(re.findall(r'<a xlink:href="[^"]+"', dom)) >= len(graph.nodes)


def test_spearman_known_numbers():
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)  # scipy.stats.spearmanr
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman(torch.tensor([0.1, 10.0, 100.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)  # ties: average ranks
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_faithfulness_arithmetic():
    full, empty = 4.0, 1.0
    assert faithfulness(full, full, empty) == 1.0 and faithfulness(empty, full, empty) == 0.0
    assert faithfulness(2.5, full, empty) == 0.5 and completeness_left(1.3, full, empty) == pytest.approx(0.1)
    assert math.isnan(faithfulness(1.0, 2.0, 2.0))
    assert fraction_surviving(1.0, 4.0) == 0.25 and math.isnan(fraction_surviving(1.0, 0.0))
    control = against_random(0.9, [0.1, 0.3, 0.95, math.nan])
    assert control["n_random"] == 3 and control["beats_random"] == pytest.approx(2 / 3)
    assert control["random_mean"] == pytest.approx(0.45) and control["random_std"] == pytest.approx(
        0.4444097, rel=1e-5
    )  # sample std
    assert math.isnan(against_random(1.0, [])["random_mean"])


def test_top_k_agreement():
    exact = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.0])
    assert top_k(exact, 3) == {0, 2, 3}
    assert same_top_k(torch.tensor([3.0, 0.0, 1.0, 2.0, 0.5]), exact)  # same set, other order
    assert not same_top_k(torch.tensor([3.0, 2.5, 1.0, 0.0, 0.5]), exact)
