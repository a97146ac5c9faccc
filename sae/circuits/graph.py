"""A circuit as a graph users can open: nodes are dictionary features (or a layer's reconstruction error, or the
output metric a circuit explains), edges say how much an upstream node moves a downstream one, and by which method.

Files, all under one folder (``circuits/<target>/``):

- ``graph.json``: the graph itself (``GRAPH_SCHEMA`` is its JSON schema; ``read_json`` reads it back);
- ``graph.dot`` and ``graph.svg``: Graphviz, inputs at the bottom and the target at the top, one rank per layer,
  edge width by |weight|, blue with an arrow for a positive edge and red with a bar (``tee``: inhibitory) for a
  negative one (``analysis.edge_sign=both`` keeps them), solid for ablation and dashed for
  attribution (gradient or integrated gradients); error nodes dashed boxes, an output node an ellipse;
- ``graph.html``: the picture inline plus a table of the nodes; every node links to its row, and every feature to
  its dashboard page (``<dashboard>/<method>/<index>.html``, as ``sae.dashboard`` writes them) and shows its
  automatic-interpretation explanation when one is given.

The drawing needs Graphviz's ``dot`` binary (Debian: ``apt-get install graphviz``); the JSON and DOT do not.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sae.errors import ConfigError
from sae.io.atomic import write_text as write_text_atomic

FORMAT = "sae.circuit-graph/1"
KINDS = ("feature", "error", "output")
EDGE_METHODS = ("ablation", "attribution", "integrated_gradients")


@dataclass
class Node:
    """One node. ``index`` is the feature's index for ``kind='feature'``, None for an error or output node."""

    id: str
    kind: str
    layer: int
    hook: str
    method: str = ""  # the dictionary (or baseline) the feature belongs to: the dashboard's folder name
    index: int | None = None
    activation: float = 0.0  # mean activation on the circuit's contexts, at the position read
    effect: float = 0.0  # its effect on the target (the edge weight into its parent, or its own total effect)
    top_tokens: list[str] = field(default_factory=list)
    explanation: str | None = None


@dataclass
class Edge:
    """``source`` (upstream) moves ``target`` (downstream) by ``weight``, measured by ``method``."""

    source: str
    target: str
    weight: float
    method: str


def feature_id(hook: str, index: int) -> str:
    return f"{hook}/{index}"


def error_id(hook: str) -> str:
    return f"{hook}/error"


@dataclass
class CircuitGraph:
    """Nodes by id and edges between them; ``target`` names what the circuit explains, ``model`` the model it was
    found in (a stand-in model says so), ``meta`` the settings that produced it."""

    target: str
    model: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def add_node(self, node: Node) -> Node:
        """Add ``node``, or return the one already there under its id (a feature reached by two paths is one node)."""
        if node.kind not in KINDS:
            raise ValueError(f"node kind {node.kind!r} is not one of {KINDS}")
        if (node.kind == "feature") != (node.index is not None):
            raise ValueError(f"node {node.id!r}: a feature has an index, an error or output node has none")
        return self.nodes.setdefault(node.id, node)

    def add_feature(self, hook: str, layer: int, index: int, method: str, **values) -> Node:
        return self.add_node(Node(feature_id(hook, index), "feature", layer, hook, method, int(index), **values))

    def add_error(self, hook: str, layer: int, method: str = "", **values) -> Node:
        return self.add_node(Node(error_id(hook), "error", layer, hook, method, None, **values))

    def add_edge(self, source: str, target: str, weight: float, method: str) -> Edge:
        for end in (source, target):
            if end not in self.nodes:
                raise ValueError(f"edge endpoint {end!r} is not a node")
        if method not in EDGE_METHODS:
            raise ValueError(f"edge method {method!r} is not one of {EDGE_METHODS}")
        edge = Edge(source, target, float(weight), method)
        self.edges.append(edge)
        return edge

    def attach_explanations(self, explanations: Mapping[tuple[str, int], str]) -> int:
        """Set each feature's explanation from ``{(method, index): text}``; returns how many were found."""
        found = 0
        for node in self.nodes.values():
            text = explanations.get((node.method, node.index)) if node.kind == "feature" else None
            if text:
                node.explanation, found = str(text), found + 1
        return found

    def to_dict(self) -> dict:
        return {"format": FORMAT, "target": self.target, "model": self.model, "meta": self.meta,
                "nodes": [asdict(n) for n in sorted(self.nodes.values(), key=_node_key)],
                "edges": [asdict(e) for e in self.edges]}

    @classmethod
    def from_dict(cls, data: Mapping) -> CircuitGraph:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ConfigError(f"not a circuit graph: expected \"format\": \"{FORMAT}\"")
        graph = cls(str(data["target"]), str(data["model"]), meta=dict(data.get("meta", {})))
        try:
            for n in data["nodes"]:
                graph.add_node(Node(**n))
            for e in data["edges"]:
                graph.add_edge(e["source"], e["target"], e["weight"], e["method"])
        except (TypeError, KeyError, ValueError) as err:
            raise ConfigError(f"circuit graph is malformed: {err}") from None
        return graph


def _node_key(node: Node) -> tuple:
    return (node.layer, KINDS.index(node.kind), node.index if node.index is not None else -1, node.id)


_NUMBER = {"type": "number"}
GRAPH_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sae circuit graph",
    "type": "object",
    "required": ["format", "target", "model", "meta", "nodes", "edges"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT},
        "target": {"type": "string"},
        "model": {"type": "string"},
        "meta": {"type": "object"},
        "nodes": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["id", "kind", "layer", "hook", "method", "index", "activation", "effect", "top_tokens",
                         "explanation"],
            "properties": {
                "id": {"type": "string"}, "kind": {"enum": list(KINDS)}, "layer": {"type": "integer"},
                "hook": {"type": "string"}, "method": {"type": "string"},
                "index": {"type": ["integer", "null"], "minimum": 0},
                "activation": _NUMBER, "effect": _NUMBER,
                "top_tokens": {"type": "array", "items": {"type": "string"}},
                "explanation": {"type": ["string", "null"]}}}},
        "edges": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["source", "target", "weight", "method"],
            "properties": {"source": {"type": "string"}, "target": {"type": "string"}, "weight": _NUMBER,
                           "method": {"enum": list(EDGE_METHODS)}}}},
    },
}


# ---------------------------------------------------------------------------------------------------- JSON


def write_json(graph: CircuitGraph, path: Path) -> None:
    write_text_atomic(path, json.dumps(graph.to_dict(), indent=1, allow_nan=False) + "\n")


def read_json(path: Path) -> CircuitGraph:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read circuit graph '{path}': {err}") from None
    return CircuitGraph.from_dict(data)


# ---------------------------------------------------------------------------------------------------- DOT / SVG


def _show(token: str) -> str:
    """A token as visible text: newlines and tabs spelled out, quotes kept."""
    return repr(token)[1:-1] if token else "''"


def dashboard_href(node: Node, dashboard: str) -> str | None:
    """The feature's dashboard page relative to the graph's folder; None for error and output nodes."""
    if node.kind != "feature":
        return None
    return f"{dashboard.rstrip('/')}/{node.method}/{node.index}.html"


def node_title(node: Node) -> str:
    if node.kind == "feature":
        return f"L{node.layer} {node.method} #{node.index}"
    return f"L{node.layer} error" if node.kind == "error" else f"output: {node.hook}"


def _label(node: Node, tokens: int) -> str:
    import graphviz

    lines = [node_title(node), f"act {node.activation:.3g}  effect {node.effect:+.3g}"]
    if node.top_tokens:
        lines.append(" ".join(_show(t) for t in node.top_tokens[:tokens]))
    return "\\n".join(graphviz.escape(line) for line in lines)


def to_dot(graph: CircuitGraph, dashboard: str | None = "../../dashboard", tokens: int = 3, anchors: bool = False):
    """The graph as a ``graphviz.Digraph``; each feature node's URL is its dashboard page when ``dashboard`` is set,
    and with ``anchors`` (the drawing inside graph.html) every other node links to its row of the nodes table.

    Node names are ``n0, n1, ...`` (ids hold characters DOT reads as ports); the id is each node's tooltip.
    """
    import graphviz

    names = {node_id: f"n{i}" for i, node_id in enumerate(sorted(graph.nodes, key=lambda k: _node_key(graph.nodes[k])))}
    dot = graphviz.Digraph("circuit", graph_attr={"rankdir": "BT", "label": f"{graph.target}\\n{graph.model}",
                                                  "labelloc": "t", "fontsize": "11"},
                           node_attr={"shape": "box", "style": "rounded", "fontsize": "10"})
    for layer in sorted({n.layer for n in graph.nodes.values()}):
        with dot.subgraph(name=f"layer{layer}", graph_attr={"rank": "same"}) as sub:
            for node in sorted((n for n in graph.nodes.values() if n.layer == layer), key=_node_key):
                attrs = {"label": _label(node, tokens), "tooltip": node.explanation or node.id, "id": names[node.id]}
                if node.kind == "error":
                    attrs.update(style="dashed")
                if node.kind == "output":
                    attrs.update(shape="ellipse", style="bold")
                href = dashboard_href(node, dashboard) if dashboard else None
                href = f"#{_anchor(node.id)}" if href is None and anchors else href
                if href:
                    attrs.update(URL=href, target="_top")
                sub.node(names[node.id], **attrs)
    top = max((abs(e.weight) for e in graph.edges), default=1.0) or 1.0
    for edge in graph.edges:
        dot.edge(names[edge.source], names[edge.target], color="#1f77b4" if edge.weight >= 0 else "#d62728",
                 style="solid" if edge.method == "ablation" else "dashed",
                 arrowhead="normal" if edge.weight >= 0 else "tee",
                 penwidth=f"{0.5 + 3.5 * abs(edge.weight) / top:.2f}", tooltip=f"{edge.method}: {edge.weight:+.4g}")
    return dot


def write_dot(graph: CircuitGraph, path: Path, dashboard: str | None = "../../dashboard") -> None:
    write_text_atomic(path, to_dot(graph, dashboard).source)


def have_dot() -> bool:
    return shutil.which("dot") is not None


def svg_text(graph: CircuitGraph, dashboard: str | None = "../../dashboard", anchors: bool = False) -> str:
    """The drawing as SVG text, through Graphviz's ``dot`` (``anchors``: see ``to_dot``)."""
    if not have_dot():
        raise ConfigError("Graphviz's `dot` is not on PATH, so graph.svg cannot be drawn; "
                          "install it (Debian/Ubuntu: apt-get install graphviz)")
    return to_dot(graph, dashboard, anchors=anchors).pipe(format="svg").decode()


def write_svg(graph: CircuitGraph, path: Path, dashboard: str | None = "../../dashboard") -> None:
    write_text_atomic(path, svg_text(graph, dashboard))


# ---------------------------------------------------------------------------------------------------- HTML


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:80em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}th{background:#eee}.missing{color:#999}
.graph svg{max-width:100%;height:auto}"""


def _node_row(node: Node, dashboard: str, html_dir: Path | None) -> str:
    href = dashboard_href(node, dashboard)
    if href is None:
        link = html.escape(node_title(node))
        note = "reconstruction error: no dashboard page" if node.kind == "error" else "what the circuit explains"
    else:
        link = f"<a class='dashboard' href='{html.escape(href)}'>{html.escape(node_title(node))}</a>"
        exists = html_dir is None or Path(os.path.normpath(html_dir / href)).is_file()  # the folder may not exist yet
        note = "" if exists else "<span class='missing'>(page not built: run analysis=features)</span>"
    tokens = html.escape(", ".join(_show(t) for t in node.top_tokens))
    explanation = html.escape(node.explanation) if node.explanation else ""
    return (f"<tr id='{html.escape(_anchor(node.id))}' data-node='{html.escape(node.id)}'><td>{link} {note}</td>"
            f"<td>{node.layer}</td><td>{node.activation:.4g}</td><td>{node.effect:+.4g}</td><td>{tokens}</td>"
            f"<td>{explanation}</td></tr>")


def _anchor(node_id: str) -> str:
    return "node-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in node_id)


def html_page(
    graph: CircuitGraph, svg: str | None, dashboard: str = "../../dashboard", html_dir: Path | None = None
) -> str:
    """The page: title (with the model, so a stand-in is labelled), the drawing, the nodes table and the edges."""
    rows = "".join(_node_row(n, dashboard, html_dir) for n in sorted(graph.nodes.values(), key=_node_key))
    edges = "".join(f"<tr><td><a href='#{_anchor(e.source)}'>{html.escape(e.source)}</a></td>"
                    f"<td><a href='#{_anchor(e.target)}'>{html.escape(e.target)}</a></td>"
                    f"<td>{e.weight:+.4g}</td><td>{html.escape(e.method)}</td></tr>" for e in graph.edges)
    picture = f"<div class='graph'>{svg[svg.find('<svg'):]}</div>" if svg else \
        "<p class='missing'>(no drawing: Graphviz's dot was not available)</p>"
    title = f"Circuit of {graph.target}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(graph.model)}</p>"
        f"{picture}<h2>Nodes</h2><table id='nodes'><tr><th>node</th><th>layer</th><th>activation</th><th>effect</th>"
        f"<th>top tokens</th><th>explanation</th></tr>{rows}</table>"
        "<h2>Edges</h2><table id='edges'><tr><th>from</th><th>to</th><th>weight</th><th>method</th></tr>"
        f"{edges}</table>"
        "</body></html>"
    )


def write_html(graph: CircuitGraph, path: Path, dashboard: str = "../../dashboard", svg: str | None = None) -> None:
    """``graph.html``; ``svg`` is drawn here when not given and ``dot`` is there (the page still works without)."""
    path = Path(path)
    if svg is None and have_dot():
        svg = svg_text(graph, dashboard, anchors=True)
    write_text_atomic(path, html_page(graph, svg, dashboard, path.parent))


def write_all(graph: CircuitGraph, directory: Path, dashboard: str = "../../dashboard") -> list[Path]:
    """``graph.json``, ``graph.dot``, ``graph.svg`` and ``graph.html`` under ``directory``; the SVG needs ``dot``."""
    directory = Path(directory)
    os.makedirs(directory, exist_ok=True)
    write_json(graph, directory / "graph.json")
    write_dot(graph, directory / "graph.dot", dashboard)
    write_svg(graph, directory / "graph.svg", dashboard)
    write_html(graph, directory / "graph.html", dashboard)
    return [directory / f"graph.{ext}" for ext in ("json", "dot", "svg", "html")]
