"""The package's layering: imports run one way (a lower layer never imports a higher one), and there is no cycle.

Imports are read with ``ast`` (nothing is executed), including the ones inside functions, so a lazy import cannot
hide a dependency against the layering.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# Each part of the package and its layer: a module may import its own part and any part of a lower layer, never a
# part of its own layer or of a higher one. (docs/architecture.md draws this.)
LAYERS = {
    "errors": 0, "distributed": 0,
    "dictionaries": 1,
    "baselines": 2,
    "io": 3,
    "lm": 4,
    "data": 5,
    "evaluation": 6,
    "training": 7, "features": 7,
    "autointerp": 8, "circuits": 8, "probing": 8,
    "bench": 9, "cli": 9,
}
ROOT_PACKAGE = "sae"  # sae/__init__.py re-exports the user-facing API of layers 1 and 3


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str) -> set[str]:
    """Every ``sae`` module ``path`` imports (absolute, or relative resolved against ``name``)."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(parent + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == ROOT_PACKAGE or m.startswith(ROOT_PACKAGE + ".")}


def graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    root = package_dir.parent
    paths = {module_name(p, root): p for p in package_dir.rglob("*.py")}
    return {
        m: {t for t in imports(p, m) if t in paths and t != m and not m.startswith(t + ".")} for m, p in paths.items()
    }


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ROOT_PACKAGE


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for source, targets in edges.items():
        src = part(source)
        if src == ROOT_PACKAGE:
            continue
        for target in targets:
            dst = part(target)
            if dst == src:
                continue
            if src not in LAYERS or dst not in LAYERS:
                out.append(f"{source} -> {target}: '{src if src not in LAYERS else dst}' has no layer in LAYERS")
            elif LAYERS[dst] >= LAYERS[src]:
                out.append(f"{source} (layer {LAYERS[src]}) imports {target} (layer {LAYERS[dst]})")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_imports_follow_the_layering_and_have_no_cycle():
    edges = graph(ROOT / "sae")
    assert layering_violations(edges) == []
    assert cycles(edges) == []


def test_every_part_of_the_package_has_a_layer():
    parts = {part(m) for m in graph(ROOT / "sae")} - {ROOT_PACKAGE}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


@pytest.mark.parametrize("lazy", [False, True])
def test_a_planted_cycle_or_upward_import_is_caught(tmp_path, lazy):
    """The checker itself can fail: a copy of the package with one import against the layering planted in it."""
    import shutil

    copy = tmp_path / "sae"
    shutil.copytree(ROOT / "sae", copy, ignore=shutil.ignore_patterns("__pycache__"))
    session = copy / "lm" / "session.py"
    planted = (
        "        from sae.training.run import train  # noqa\n"
        if lazy
        else "from sae.training.run import train  # noqa\n"
    )
    text = session.read_text()
    if lazy:
        text = text.replace("    def prepare_text(self) -> None:\n", "    def prepare_text(self) -> None:\n" + planted)
    else:
        text = planted + text
    session.write_text(text)
    edges = graph(copy)
    assert any("sae.lm.session (layer 4) imports sae.training.run (layer 7)" in v for v in layering_violations(edges))
    assert any("sae.lm.session" in c for c in cycles(edges))  # training imports the session: a cycle too
