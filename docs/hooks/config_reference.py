"""mkdocs hook: the configuration reference, generated from the typed schemas at every build.

Every dataclass registered in Hydra's ConfigStore by ``sae.training.config``, ``sae.evaluation.config`` and any
``sae/**/config.py`` becomes a table of its fields: the key, its type, its default in each ``conf/<group>/*.yaml``
that names the schema in its ``defaults:``, and the field's docstring (the string under it, read with ``ast``). The
YAML files of the untyped groups (``sae``, and any study or backend without a schema yet) are listed key by key
with their inline comments. ``docs/configuration.md`` holds the hand-written preamble and the marker replaced here;
``tests/test_config_reference.py`` fails when a registered field has no docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
MARKER = "<!-- generated: configuration reference -->"
PAGE = "configuration.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # document the checked-out package, not another installed copy
UNTYPED_GROUPS = ("sae", "analysis", "task", "explainer")  # listed from their YAML where no schema covers a file


@dataclasses.dataclass
class Schema:
    group: str | None
    name: str
    cls: type


@dataclasses.dataclass
class Row:
    key: str
    type: str
    doc: str | None
    owner: type
    field: str


def register_all() -> None:
    """Import every config module of the checked-out package, so that each registers its schemas."""
    modules = ["sae.training.config", "sae.evaluation.config"]
    for path in sorted((ROOT / "sae").rglob("config.py")):
        modules.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    for module in dict.fromkeys(modules):
        importlib.import_module(module)


def schemas() -> list[Schema]:
    """The project's dataclasses in Hydra's ConfigStore (Hydra's own are left out), by group then name."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    register_all()
    found = []

    def walk(tree: dict, group: str | None) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{group}/{key}" if group else key)
                continue
            cls = OmegaConf.get_type(value.node)
            if dataclasses.is_dataclass(cls) and cls.__module__.startswith("sae."):
                found.append(Schema(group, key.removesuffix(".yaml"), cls))

    walk(ConfigStore.instance().repo, None)
    return sorted(found, key=lambda s: (s.group or "", s.name))


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right under it), the base classes' included; a class
    made at run time (no source) names the class its fields come from in ``__doc_source__``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        klass = getattr(klass, "__doc_source__", klass)
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def type_name(hint: object) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def rows(cls: type, prefix: str = "") -> list[Row]:
    """Every field of a schema, nested dataclasses flattened into dotted keys."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += rows(hint, f"{prefix}{f.name}.")
        else:
            out.append(Row(prefix + f.name, type_name(hint), docs.get(f.name), cls, f.name))
    return out


def missing_docstrings() -> list[str]:
    """``module.Class.field`` of every registered field without a docstring."""
    missing = []
    for schema in schemas():
        for row in rows(schema.cls):
            if not row.doc:
                missing.append(f"{row.owner.__module__}.{row.owner.__qualname__}.{row.field}")
    return sorted(set(missing))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _defaults_list(data: dict) -> list:
    return data.get("defaults") or []


def yaml_files(schema: Schema) -> list[Path]:
    """The YAML files of the schema's group that name it in their defaults list."""
    folder = CONF / schema.group if schema.group else CONF
    return [p for p in sorted(folder.glob("*.yaml")) if schema.name in _defaults_list(_load(p))]


def _lookup(data: dict, key: str) -> object:
    node: object = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            # a group's choice, from the defaults list: `- model: pythia70m`
            for entry in _defaults_list(data):
                if isinstance(entry, dict) and key in entry:
                    return entry[key]
            return dataclasses.MISSING
        node = node[part]
    return node


def show(value: object) -> str:
    if value is dataclasses.MISSING:
        return "—"
    if value == "???":
        return "required"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("...").strip()
    return f"`{text}`"


def cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def schema_section(schema: Schema) -> str:
    files = yaml_files(schema)
    prefix = f"{schema.group}." if schema.group else ""
    title = f"`{schema.group}`" if schema.group else "top level of " + ", ".join(f"`{p.name}`" for p in files)
    lines = [f"### {title}: `{schema.name}`", ""]
    doc = inspect.getdoc(schema.cls)
    if doc and not doc.startswith(schema.cls.__name__ + "("):  # dataclasses' generated signature is no docstring
        lines += [" ".join(doc.split("\n\n")[0].split()), ""]
    where = ", ".join(f"`{p.relative_to(ROOT)}`" for p in files) or "none (the schema's own defaults)"
    lines += [f"`{schema.cls.__module__}.{schema.cls.__qualname__}`; values in {where}.", ""]
    heads = [p.stem for p in files] or ["default"]
    lines += [
        "| key | type | " + " | ".join(f"`{h}`" if files else h for h in heads) + " | meaning |",
        "|---|---|" + "---|" * len(heads) + "---|",
    ]
    data = [_load(p) for p in files]
    for row in rows(schema.cls):
        if data:
            values = [show(_lookup(d, row.key)) for d in data]
        else:
            values = [show(_dataclass_default(schema.cls, row.key))]
        lines.append(f"| `{prefix}{row.key}` | `{cell(row.type)}` | " + " | ".join(values) + f" | {cell(row.doc)} |")
    return "\n".join(lines)


def _dataclass_default(cls: type, key: str) -> object:
    from omegaconf import MISSING

    node: object = cls()
    for part in key.split("."):
        node = getattr(node, part)
    return dataclasses.MISSING if node == MISSING else node


_COMMENT = re.compile(r"^\s*(?:-\s*)?([A-Za-z_][\w]*)\s*:.*?\s#\s?(.*)$")


def _leading_comment(text: str) -> str:
    lead = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lead.append(line.lstrip("# "))
    return " ".join(lead)


def _first_sentence(text: str) -> str:
    match = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    return text[: match.start() + 1] if match else text


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in data.items():
        if key == "defaults":
            continue
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((prefix + str(key), value))
    return out


def untyped_section(group: str, covered: set[Path]) -> str:
    files = [p for p in sorted((CONF / group).glob("*.yaml")) if p not in covered]
    if not files:
        return ""
    lines = [f"### `{group}` (untyped)", ""]
    for path in files:
        comments = {}
        for line in path.read_text().splitlines():
            match = _COMMENT.match(line)
            if match:
                comments.setdefault(match.group(1), match.group(2).strip())
        head = _first_sentence(" ".join(_leading_comment(path.read_text()).split()))
        lines += [f"`{group}={path.stem}` (`{path.relative_to(ROOT)}`){': ' + cell(head) if head else ''}", ""]
        lines += ["| key | default | comment in the file |", "|---|---|---|"]
        for key, value in _flatten(_load(path)):
            lines.append(f"| `{group}.{key}` | {show(value)} | {cell(comments.get(key.split('.')[-1]))} |")
        lines.append("")
    return "\n".join(lines)


def render() -> str:
    found = schemas()
    covered = {p for s in found for p in yaml_files(s)}
    parts = ["## Typed groups", ""]
    parts += [schema_section(s) + "\n" for s in found]
    untyped = [untyped_section(g, covered) for g in UNTYPED_GROUPS]
    if any(untyped):
        parts += [
            "## Untyped groups",
            "",
            "These files have no schema: a variant takes the settings its class declares (checked by "
            "`sae.training.validation`), and a study or backend without a typed schema reads its keys itself. "
            "Their values and the comments beside them:",
            "",
        ]
        parts += [u for u in untyped if u]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/{PAGE} lost its marker {MARKER!r}: the generated reference has nowhere to go")
    return markdown.replace(MARKER, render())
