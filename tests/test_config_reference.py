"""The configuration reference is generated from the typed schemas (docs/hooks/config_reference.py): every field
registered in Hydra's ConfigStore needs a docstring, and the page lists every field with its YAML default."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HOOK = Path(__file__).resolve().parents[1] / "docs" / "hooks" / "config_reference.py"


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("config_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the module look themselves up there
    spec.loader.exec_module(module)
    return module


def test_every_registered_schema_field_has_a_docstring(reference):
    missing = reference.missing_docstrings()
    assert not missing, f"schema fields without a docstring (the configuration reference shows them): {missing}"


def test_the_reference_lists_every_field_with_its_yaml_default(reference):
    found = reference.schemas()
    names = {s.name for s in found}
    assert {"run_schema", "train_schema", "hook_schema", "evaluate_schema"} <= names
    page = reference.render()
    for schema in found:
        for row in reference.rows(schema.cls):
            prefix = f"{schema.group}." if schema.group else ""
            assert f"| `{prefix}{row.key}` |" in page
    # the value comes from the group's YAML file, beside the field's type and docstring
    line = next(line for line in page.splitlines() if line.startswith("| `train.tokens` |"))
    assert "`int`" in line and "`4000000`" in line and "Activation vectors to train on" in line
    line = next(line for line in page.splitlines() if line.startswith("| `hook.layer` |"))
    assert "`3`" in line


def test_a_study_schema_in_its_own_package_is_discovered(reference, tmp_path, monkeypatch):
    """Any sae/**/config.py is imported: a schema a study registers there shows up without a list to edit."""
    package = tmp_path / "sae" / "zz_study"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text(
        "from dataclasses import dataclass\n"
        "from hydra.core.config_store import ConfigStore\n\n\n"
        "@dataclass\nclass ZzSettings:\n    n: int = 3\n    \"\"\"How many.\"\"\"\n\n\n"
        "ConfigStore.instance().store(group='analysis', name='zz_schema', node=ZzSettings)\n"
    )
    monkeypatch.setattr(reference, "ROOT", tmp_path)
    monkeypatch.setattr(reference, "CONF", tmp_path / "conf")
    import sae

    monkeypatch.setattr(sae, "__path__", [*sae.__path__, str(tmp_path / "sae")])
    try:
        reference.register_all()
        assert any(s.name == "zz_schema" for s in reference.schemas())
    finally:
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().repo.get("analysis", {}).pop("zz_schema.yaml", None)
        sys.modules.pop("sae.zz_study.config", None)
        sys.modules.pop("sae.zz_study", None)


def test_the_page_keeps_its_marker():
    page = HOOK.parents[1] / "configuration.md"
    assert "<!-- generated: configuration reference -->" in page.read_text()
