"""The study end to end with the LLM-free token-lookup scorer: outputs, controls, refusals."""

import csv
import json
import math

import pytest
from autointerp_helpers import HashLLM, planted_codes, word_decode

from sae.autointerp import RecordConfig, StudyConfig, iter_feature_activations, output_paths, run_from_config, run_study
from sae.autointerp.backends.token_lookup import TokenLookup
from sae.autointerp.interpret import LLMInterpreter
from sae.errors import ConfigError

RECORDS = RecordConfig(fragment_len=16, n_explain=3, n_score_top=3, n_score_random=3)


def _source(methods=("dictionary", "pca"), layers=(1, 2), feats=(0, 1, 2, 3)):
    for layer in layers:
        for m, method in enumerate(methods):
            codes, ids = planted_codes(seed=layer * 10 + m)
            yield from iter_feature_activations(method, f"blocks.{layer}.hook_resid_post", layer, codes, ids, feats, 16)


def test_token_lookup_study_writes_every_output_and_reports_both_controls(tmp_path):
    res = run_study(_source(), TokenLookup(), word_decode, tmp_path, StudyConfig(records=RECORDS, n_bootstrap=100))
    paths = output_paths(tmp_path)
    assert all(p.is_file() for p in paths.values())
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 12  # 3 live features (f3 never fires: skipped) x 2 methods x 2 layers
    planted = [r for r in rows if r["feature"] == "0"]
    assert all(float(r["simulation"]) > 0.9 and r["explanation"] == "tokens ' cat'" for r in planted)
    assert all(float(r["shuffled_simulation"]) < 0.5 for r in planted)  # another feature's tokens predict nothing
    summary = list(csv.DictReader(open(paths["summary"])))
    sim = [r for r in summary if r["score"] == "simulation" and r["tercile"] == "all"]
    assert {(r["method"], r["layer"]) for r in sim} == {
        ("dictionary", "1"),
        ("dictionary", "2"),
        ("pca", "1"),
        ("pca", "2"),
    }
    assert all(r["n_features"] == "3" and r["n_unscorable"] == "1" for r in sim)
    assert all(float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"]) for r in sim)
    assert {r["score"] for r in summary} >= {"shuffled_simulation", "lookup_detection", "fuzzing_auroc"}
    lines = [json.loads(x) for x in open(paths["records"])]
    first = lines[0]
    assert first["fragments"]["normalisation"].startswith("floor(10 * relu(a) / max)")
    assert len(first["details"]["explainer"]["simulated"]["top"]) == 3
    assert first["details"]["shuffled"]["explanation"]["text"] != first["explanation"]
    meta = json.loads(paths["meta"].read_text())
    assert meta["explainer"]["backend"] == "token_lookup" and meta["n_features_unscorable"] == 4
    assert res.summary and not list(tmp_path.glob(".autointerp-staging*"))


def test_a_previous_result_is_never_overwritten_unless_asked(tmp_path):
    cfg = StudyConfig(records=RECORDS, n_bootstrap=20)
    run_study(_source(layers=(1,)), TokenLookup(), word_decode, tmp_path, cfg)
    before = output_paths(tmp_path)["summary"].read_text()
    with pytest.raises(ConfigError, match="exists: pass overwrite"):
        run_study(_source(layers=(2,)), TokenLookup(), word_decode, tmp_path, cfg)
    assert output_paths(tmp_path)["summary"].read_text() == before
    run_study(_source(layers=(2,)), TokenLookup(), word_decode, tmp_path, cfg, overwrite=True)
    assert output_paths(tmp_path)["summary"].read_text() != before


def test_no_scorable_features_is_one_line_and_writes_nothing(tmp_path):
    cfg = StudyConfig(records=RECORDS, n_bootstrap=20)
    with pytest.raises(ConfigError) as err:
        run_study(_source(feats=(3,)), TokenLookup(), word_decode, tmp_path, cfg)
    assert "none of the 4 features sampled is active" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="yielded no features"):
        run_study(iter(()), TokenLookup(), word_decode, tmp_path, cfg)
    assert not output_paths(tmp_path)["summary"].exists()
    with pytest.raises(ConfigError, match="autointerp.scorers"):
        StudyConfig(scorers=("simulation", "vibes"))


def test_an_llm_study_batches_across_features_and_counts_unparsed(tmp_path):
    llm = HashLLM(batch_size=4)
    cfg = StudyConfig(records=RECORDS, n_bootstrap=20, chunk=3)
    res = run_study(_source(layers=(1,), methods=("dictionary",)), LLMInterpreter(llm), word_decode, tmp_path, cfg)
    assert len(res.rows) == 3 and all(r["explanation"].startswith("words like number") for r in res.rows)
    assert all(math.isfinite(r["simulation"]) and math.isfinite(r["detection_auroc"]) for r in res.rows)


def test_run_from_config_builds_the_token_lookup_explainer_and_its_cache(tmp_path):
    analysis = {"fragment_len": 16, "n_explain": 3, "n_score_top": 3, "n_score_random": 3,
                "n_bootstrap": 20, "seed": 0}
    res = run_from_config(_source(layers=(1,)), word_decode, tmp_path, analysis, {"backend": "token_lookup"},
                          meta={"lm": "test words"})
    assert res.meta["lm"] == "test words" and res.meta["cache"]["mode"] == "readwrite"
    with pytest.raises(ConfigError, match="explainer.backend='nope'"):
        run_from_config(_source(layers=(1,)), word_decode, tmp_path / "b", analysis, {"backend": "nope"})
    with pytest.raises(ConfigError, match="autointerp.cache_mode='sometimes'"):
        run_from_config(_source(layers=(1,)), word_decode, tmp_path / "c", {**analysis, "cache_mode": "sometimes"},
                        {"backend": "token_lookup"})


def test_the_shipped_configs_drive_run_from_config(tmp_path, monkeypatch):
    from conftest import ROOT
    from omegaconf import OmegaConf

    from sae.autointerp.backends import make_backend

    analysis = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "analysis" / "autointerp.yaml"))
    explainers = {
        p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in (ROOT / "conf" / "explainer").glob("*.yaml")
    }
    assert {k: v["backend"] for k, v in explainers.items()} == {k: k for k in ("openai", "hf_local", "token_lookup")}
    small = {**analysis, **RECORDS.__dict__, "n_bootstrap": 20}
    res = run_from_config(_source(layers=(1,)), word_decode, tmp_path, small, explainers["token_lookup"])
    assert res.meta["config"]["records"]["fragment_len"] == 16 and (tmp_path / "autointerp" / "cache.sqlite").exists()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY: that environment variable is not set"):
        make_backend(explainers["openai"])
    with pytest.raises(ConfigError, match="explainer.model=./no/such/model.gguf: no such GGUF file"):
        make_backend({**explainers["hf_local"], "model": "./no/such/model.gguf"})


def test_a_failure_while_moving_files_into_place_leaves_no_summary(tmp_path, monkeypatch):
    import os

    import sae.autointerp.study as study

    moved = []

    def flaky(src, dst):
        if moved:
            raise OSError("disk full")
        moved.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(study.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        run_study(
            _source(layers=(1,)), TokenLookup(), word_decode, tmp_path, StudyConfig(records=RECORDS, n_bootstrap=20)
        )
    assert not output_paths(tmp_path)["summary"].exists() and not list(tmp_path.glob(".autointerp-staging*"))
