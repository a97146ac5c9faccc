"""Every study's settings are typed (a schema per group in Hydra's ConfigStore, the values in conf/analysis/*.yaml)
and its defaults finish on a tiny stand-in: metrics, residue and features here (patching:
tests/circuits/test_circuits_study.py, circuits: tests/circuits/test_circuits_discovery.py); the text settings are
declared once."""

import dataclasses

import pytest
import torch
from conftest import compose_config, run_in_process, tiny_meta

from sae.dictionaries import build
from sae.io.saving import save_dictionary


@pytest.fixture(scope="module")
def tiny_run(tiny_lm_dir, tiny_text, tmp_path_factory):
    """A random TopK dictionary at layers.1.resid of the tiny LM (saved, not trained: the studies only read it)."""
    root = tmp_path_factory.mktemp("defaults")
    torch.manual_seed(0)
    meta = tiny_meta(tiny_lm_dir, tiny_text)
    save_dictionary(build("topk", 32, 64, k=4, aux_coeff=0.0, k_aux=None), root / "run" / "d", meta)
    return root / "run"


@pytest.mark.parametrize("study,written", [("metrics", "eval.csv"), ("residue", "residue/summary.json"),
                                           ("features", "monosemanticity.csv")])
def test_each_study_s_defaults_finish(tiny_run, tmp_path, study, written):
    """analysis=<study> with every analysis.* setting at its default, as a new user runs it."""
    proc = run_in_process("evaluate.py", f"analysis={study}", f"run={tiny_run}", f"out={tmp_path}", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / written).is_file()


@pytest.mark.parametrize("study,schema", [("patching", "PatchingSettings"), ("circuits", "CircuitsSettings"),
                                          ("features", "FeaturesSettings"), ("metrics", "MetricsSettings"),
                                          ("residue", "ResidueSettings")])
def test_every_study_receives_its_settings_object(hydra_app, study, schema):
    from sae.evaluation.studies import settings_of

    settings = settings_of(compose_config([f"analysis={study}", "run=x"], "evaluate"))
    assert type(settings).__name__ == schema and dataclasses.is_dataclass(settings)
    assert all(getattr(settings, f.name) != "???" for f in dataclasses.fields(settings))  # every value in the YAML


def test_the_text_settings_are_declared_once():
    """Training's data schema extends the session's text settings, evaluate.py's data.* overrides are made from them:
    a text setting added to TextSettings appears in both."""
    from sae.evaluation.config import DataOverrides
    from sae.lm.text_settings import TextSettings
    from sae.training.config import TextDataConfig

    names = [f.name for f in dataclasses.fields(TextSettings)]
    assert issubclass(TextDataConfig, TextSettings)
    assert [f.name for f in dataclasses.fields(DataOverrides)] == names
    assert all(f.default is None for f in dataclasses.fields(DataOverrides))
    assert set(compose_config(["run=x"], "evaluate").data) == set(names)
