"""A set of dictionaries from one run: each trains, saves, logs and evaluates exactly as if it were trained alone."""

import csv
import json

import pytest
import torch
from conftest import compose_config, run_cli, tiny_overrides
from safetensors.torch import load_file

from sae.errors import ConfigError
from sae.evaluation.metrics import dictionary_mmcs
from sae.io.checkpoints import dictionary_from_checkpoint
from sae.training.run import RunInfo, train
from sae.training.validation import validate

# three hooks (two sites), three variants; resampling every 4 steps, with atoms at cosine > 0.3 counting as
# duplicates so that every dictionary resamples (each drawing from its own generator)
SET = [
    {"name": "l0", "hook": {"layer": 0}},
    {"name": "l2_topk", "hook": {"layer": 2}, "sae": {"variant": "topk", "k": 8, "ratio": 2}},
    {"name": "l1_mlp", "hook": {"layer": 1, "site": "mlp"}, "sae": {"variant": "relu", "l1_coeff": 0.01}},
]
EXTRA = ["train.resample_every=4", "train.dead_window=256", "train.resample_until=0.9", "train.duplicate_cos=0.3"]


pytestmark = pytest.mark.usefixtures("hydra_app")  # sets naming another variant read its defaults through Hydra
_compose = compose_config


def _set_override(entries: list[dict]) -> str:
    """``dictionaries=[...]`` in Hydra's override grammar."""
    def value(v):
        return "{" + ",".join(f"{k}:{value(x)}" for k, x in v.items()) + "}" if isinstance(v, dict) else str(v)

    return "dictionaries=[" + ",".join(value(e) for e in entries) + "]"


def _alone_overrides(entry: dict) -> list[str]:
    """The same dictionary as an ordinary single run: its hook and sae on the command line."""
    sae = dict(entry.get("sae", {}))
    variant = sae.pop("variant", None)
    return ([f"sae={variant}"] if variant else []) + [f"hook.{k}={v}" for k, v in entry["hook"].items()] + [
        f"sae.{k}={v}" for k, v in sae.items()]


def test_set_trains_each_dictionary_as_if_alone(tiny_lm_dir, tiny_text, tmp_path):
    base = tiny_overrides(tiny_lm_dir, tiny_text, tmp_path, *EXTRA)
    together = train(_compose([*base, _set_override(SET)]), RunInfo(tmp_path / "set", "set", None))
    assert set(together) == {e["name"] for e in SET}
    for entry in SET:
        alone_dir = tmp_path / f"alone_{entry['name']}"
        alone = train(_compose([*base, *_alone_overrides(entry)]), RunInfo(alone_dir, entry["name"], None))
        in_set = tmp_path / "set" / entry["name"]
        weights, weights_alone = (
            load_file(str(in_set / "sae.safetensors")),
            load_file(str(alone_dir / "sae.safetensors")),
        )
        assert weights.keys() == weights_alone.keys()
        for key in weights:
            torch.testing.assert_close(
                weights[key], weights_alone[key], rtol=1e-5, atol=1e-6, msg=f"{entry['name']}.{key}"
            )
        meta, meta_alone = (json.loads((d / "sae.json").read_text()) for d in (in_set, alone_dir))
        assert meta.pop("name") == entry["name"] and meta["data"] == meta_alone["data"]
        assert {k: meta[k] for k in ("variant", "hparams", "hook", "n_features")} == {
            k: meta_alone[k] for k in ("variant", "hparams", "hook", "n_features")}
        assert together[entry["name"]]["fvu"] == pytest.approx(alone["fvu"], rel=1e-4)
        assert together[entry["name"]]["ce_spliced"] == pytest.approx(alone["ce_spliced"], rel=1e-4)
    rows = list(csv.DictReader(open(tmp_path / "set" / "csv" / "metrics.csv")))
    for entry in SET:  # otherwise the test would not check the per-dictionary generators
        assert sum(float(r.get(f"{entry['name']}/train/resampled") or 0) for r in rows) > 0, entry["name"]


def test_set_from_the_command_line_then_evaluate(tiny_lm_dir, tiny_text, tmp_path):
    entries = [{"name": "a", "hook": {"layer": 0}}, {"hook": {"layer": 2}, "sae": {"variant": "topk", "k": 8}}]
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), _set_override(entries))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["a", "layers.2.resid.topk.x4.k8"]
    for name, entry in zip(names, entries):
        meta = json.loads((tmp_path / name / "sae.json").read_text())
        assert meta["hook"] == {"layer": entry["hook"]["layer"], "site": "resid"} and meta["name"] == name
        assert "l0" in json.loads((tmp_path / name / "metrics.json").read_text())
    assert not (tmp_path / "sae.json").exists()
    header = next(csv.reader(open(tmp_path / "csv" / "metrics.csv")))
    assert {"a/train/loss", f"{names[1]}/train/l0", "a/heldout/fvu", "train/lr"} <= set(header)
    # a member read back from the training checkpoint is the dictionary that was saved (which one: by name)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="holds 2 dictionaries"):
        dictionary_from_checkpoint(last)
    for name in names:
        assert dictionary_mmcs(dictionary_from_checkpoint(last, name=name), tmp_path / name) == pytest.approx(
            1.0, abs=1e-5
        )
    evaluated = run_cli("evaluate.py", f"run={tmp_path}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "eval" / "eval.csv")))
    assert sorted(r["name"] for r in rows) == sorted(names)
    for row in rows:  # the same held-out metrics as at the end of training
        trained = json.loads((tmp_path / row["name"] / "metrics.json").read_text())
        assert float(row["fvu"]) == pytest.approx(trained["fvu"], rel=1e-5)


def test_every_bad_entry_in_one_message(tiny_lm_dir, tiny_text, tmp_path):
    entries = [
        {"name": "x", "hook": {"layer": 7}},
        {"name": "y", "sae": {"ratio": 0}},
        {"name": "z", "sae": {"variant": "nope"}},
    ]
    with pytest.raises(ConfigError) as err:
        validate(_compose([*tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), _set_override(entries)]))
    message = str(err.value)
    assert (
        "dictionary 'y': sae.ratio=0 must be > 0" in message and "dictionary 'z': unknown sae.variant 'nope'" in message
    )
    entries[1:] = []  # the layer problem is found once the others are fixed
    with pytest.raises(ConfigError, match="dictionary 'x': hook.layer=7 does not exist"):
        validate(_compose([*tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), _set_override(entries)]))


@pytest.mark.parametrize("entries,message", [
    ([{"name": "a", "hook": {"layer": 0}}, {"name": "a", "hook": {"layer": 1}}], "name 'a' is used twice"),
    ([{"hook": {"layer": 0}}, {"hook": {"layer": 0}}], "is used twice"),
    ([{"name": "a", "layer": 0}], "unknown keys ['layer']"),
    ([{"name": "checkpoints"}], "cannot be a directory name"),
])
def test_malformed_sets(tiny_lm_dir, tiny_text, tmp_path, entries, message):
    with pytest.raises(ConfigError, match=None) as err:
        validate(_compose([*tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), _set_override(entries)]))
    assert message in str(err.value)


def test_variant_change_starts_from_that_variants_defaults(tiny_lm_dir, tiny_text, tmp_path):
    cfg = _compose([*tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), "sae.ratio=8",
                    _set_override([{"name": "t", "sae": {"variant": "topk", "k": 4}}, {"name": "r"}])])
    topk, relu = validate(cfg)
    assert topk.cfg.sae.ratio == 4 and topk.cfg.sae.aux_coeff == 0.03125 and "l1_coeff" not in topk.cfg.sae
    assert relu.cfg.sae.ratio == 8 and relu.cfg.hook.layer == 1 and relu.d_in == 32


def test_a_diverging_set_names_the_dictionary(tiny_lm_dir, tiny_text, tmp_path):
    from sae.errors import TrainingDiverged

    overrides = [*tiny_overrides(tiny_lm_dir, tiny_text, tmp_path), "train.lr=1e30", "train.warmup_steps=1",
                 _set_override([{"name": "first", "hook": {"layer": 0}}, {"name": "second", "hook": {"layer": 2}}])]
    with pytest.raises(TrainingDiverged, match=r"^dictionary '(first|second)': the loss became"):
        train(_compose(overrides), RunInfo(tmp_path / "run", "run", None))
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"
    assert not list((tmp_path / "run").rglob("sae.json"))
