"""The Neuronpedia export reads analysis=features' saved records: the bulk layout SAEDashboard writes, every gzipped
JSONL line valid against the rows' schema, the values those of the records; bad input is one line."""

import gzip
import json
from pathlib import Path

import jsonschema
import pytest
from conftest import run_cli, tiny_overrides

from sae.features.neuronpedia import main

SCHEMAS = Path(__file__).parents[1] / "schemas"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


@pytest.fixture(scope="module")
def features_out(tiny_lm_dir, tiny_text, tmp_path_factory):
    run = tmp_path_factory.mktemp("neuronpedia") / "run"
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, run), "sae=topk", "sae.k=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("evaluate.py", f"run={run}", "analysis=features", "analysis.baselines=[pca]", "analysis.figures=0",
                   "analysis.settings.min_count=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "eval"


def test_export_has_the_bulk_layout_and_valid_rows(features_out, tiny_lm_dir, tmp_path):
    export = tmp_path / "export"
    main([str(features_out), str(export), "--model", str(tiny_lm_dir)])
    model_id = tiny_lm_dir.name.lower()
    sources = sorted(p.name for p in (export / model_id).iterdir())
    assert sources == ["1-dictionary-resid", "1-pca-resid"]
    feature_schema = json.loads((SCHEMAS / "neuronpedia_feature.schema.json").read_text())
    activation_schema = json.loads((SCHEMAS / "neuronpedia_activation.schema.json").read_text())
    for source in sources:
        directory = export / model_id / source
        for name in ("release", "model", "sourceset", "source"):
            assert len((directory / f"{name}.jsonl").read_text().splitlines()) == 1
        assert json.loads((directory / "source.jsonl").read_text())["id"] == source
        features = lines(directory / "features" / "batch-0.jsonl.gz")
        activations = lines(directory / "activations" / "batch-0.jsonl.gz")
        for row in features:
            jsonschema.validate(row, feature_schema)
        for row in activations:
            jsonschema.validate(row, activation_schema)
        saved = json.loads((features_out / "features" / f"{source.split('-')[1]}.json").read_text())["features"]
        assert [f["index"] for f in features] == [str(r["index"]) for r in saved]
        record = next(r for r in saved if r.get("top"))
        feature = next(f for f in features if f["index"] == str(record["index"]))
        assert feature["maxActApprox"] == pytest.approx(record["max"]) and feature["frac_nonzero"] == record["density"]
        heights = feature["freq_hist_data_bar_heights"]
        assert len(heights) == len(record["histogram"]["edges"]) - 1
        if "dictionary" in source:  # non-negative codes: the histogram holds every token the feature fires on
            assert sum(heights) == record["count"]
        first = next(a for a in activations if a["index"] == str(record["index"]))
        top = record["top"][0]
        assert first["values"] == pytest.approx(top["acts"]) and first["maxValue"] == pytest.approx(max(top["acts"]))
        assert first["qualifyingTokenIndex"] == top["focus"] and len(first["tokens"]) == len(top["tokens"])
        assert first["layer"] == source and first["modelId"] == model_id


def test_bad_input_is_one_line(tmp_path, tiny_lm_dir, capsys, features_out):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), str(tmp_path / "x"), "--model", str(tiny_lm_dir)])
    assert stop.value.code == 2 and "analysis=features" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        main([str(features_out), str(occupied), "--model", str(tiny_lm_dir)])
    assert stop.value.code == 2 and "not an earlier export" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "mine"
