"""The study dispatch of evaluate.py: a study is a _target_ function; its files land in `out` only when it finishes."""

import pytest
from omegaconf import OmegaConf

import sae.evaluation.studies as studies
from sae.errors import ConfigError


def _cfg(out, target="tests.fake_study.study"):
    return OmegaConf.create({"out": str(out), "analysis": {"_target_": target}})


def test_a_failed_study_leaves_the_old_result_whole(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.csv").write_text("old")
    (out / "dashboard").mkdir()  # another study's files, kept
    monkeypatch.setattr(studies, "validate", lambda cfg, problems: [])

    def failing(cfg, entries):
        from pathlib import Path

        (Path(cfg.out) / "eval.csv").parent.mkdir(parents=True)
        (Path(cfg.out) / "eval.csv").write_text("new, half")
        raise RuntimeError("killed midway")

    def finishing(cfg, entries):
        from pathlib import Path

        (Path(cfg.out) / "plots").mkdir(parents=True)
        (Path(cfg.out) / "eval.csv").write_text("new")
        return ["row"]

    monkeypatch.setattr(studies, "study_function", lambda target: (failing, lambda s: []))
    with pytest.raises(RuntimeError):
        studies.run_analysis(_cfg(out))
    assert (out / "eval.csv").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    monkeypatch.setattr(studies, "study_function", lambda target: (finishing, lambda s: []))
    assert studies.run_analysis(_cfg(out)) == ["row"]
    assert (out / "eval.csv").read_text() == "new" and (out / "plots").is_dir() and (out / "dashboard").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no staging directory left


def test_an_unimportable_target_is_one_line():
    with pytest.raises(ConfigError, match="analysis._target_='sae.nowhere.study' cannot be imported"):
        studies.study_function("sae.nowhere.study")


def test_publishing_merges_folders_and_replaces_files(tmp_path):
    final, staging = tmp_path / "eval", tmp_path / "staging"
    (final / "plots").mkdir(parents=True)
    (final / "plots" / "frontier.png").write_text("metrics' figure")
    (final / "plots" / "patching_x.png").write_text("old")
    (staging / "plots").mkdir(parents=True)
    (staging / "plots" / "patching_x.png").write_text("new")
    (staging / "patching").mkdir()
    (staging / "patching" / "summary.csv").write_text("s")
    studies.publish(staging, final)
    assert (final / "plots" / "frontier.png").read_text() == "metrics' figure"
    assert (final / "plots" / "patching_x.png").read_text() == "new" and (final / "patching" / "summary.csv").is_file()
