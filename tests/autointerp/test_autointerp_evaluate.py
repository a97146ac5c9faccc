"""``evaluate.py analysis=autointerp`` end to end on a tiny trained run: token lookup, an in-process LLM on two
features, the explanations on the features dashboard, and bad input (one line, exit 2, no summary)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from conftest import run_cli, run_in_process, tiny_overrides
from safetensors.torch import load_file, save_file

# records small enough for the tiny run's held-out text (a few hundred tokens)
SMALL = ["analysis.fragment_len=8", "analysis.n_explain=1",
         "analysis.n_score_top=1", "analysis.n_score_random=1", "analysis.n_quantiles=1", "analysis.per_quantile=1",
         "analysis.n_bootstrap=50", "baseline_tokens=512"]


@pytest.fixture(scope="module")
def tiny_run(tiny_lm_dir, tiny_text, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("autointerp-run") / "run"
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, run_dir), "sae=topk", "sae.k=8",
                   "data.heldout_fraction=0.3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def _summary(out) -> list[dict]:
    with open(out / "autointerp_summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_token_lookup_end_to_end_puts_explanations_on_the_dashboard(tiny_run, tmp_path):
    out = tmp_path / "eval"
    features = run_cli("evaluate.py", f"run={tiny_run}", "analysis=features", "analysis.baselines=[pca]",
                       "analysis.figures=0", f"out={out}", "baseline_tokens=512")
    assert features.returncode == 0, features.stderr[-2000:]
    proc = run_cli("evaluate.py", f"run={tiny_run}", "analysis=autointerp", "explainer=token_lookup",
                   "analysis.n_features=4", "analysis.baselines=[pca,neurons,random]", "analysis.topk_baselines=true",
                   f"out={out}", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _summary(out)
    methods = {r["method"] for r in rows}
    assert {"dictionary", "pca", "neurons", "random"} <= methods
    assert any(m.startswith("pca_topk") for m in methods)  # the sparsified baselines, matched to the L0
    simulation = [r for r in rows if r["score"] == "simulation" and r["method"] == "dictionary"
                  and r["tercile"] == "all"]
    assert len(simulation) == 1 and 0 < int(simulation[0]["n_features"]) <= 4
    meta = json.loads((out / "autointerp" / "meta.json").read_text())
    assert meta["explainer"]["backend"] == "token_lookup"
    assert meta["lms"][0]["params"] and "parameters" in meta["label"]  # the LM is named with its size
    assert {m["method"] for m in meta["methods"]} == methods and all("n_live" in m for m in meta["methods"])
    records = [json.loads(line) for line in (out / "autointerp" / "records.jsonl").read_text().splitlines()]
    assert records and all(r["fragments"]["explain"] for r in records)
    explained = json.loads((out / "autointerp" / "explanations.json").read_text())
    (_entry, by_feature), = [(k, v) for k, v in explained["entries"].items() if not k.startswith("baselines/")]
    feature = next(iter(by_feature))
    page = (out / "dashboard" / "dictionary" / f"{feature}.html")
    assert page.is_file(), "the features study made a page for every feature that fired"
    assert "Automatic explanation" in page.read_text() and "token_lookup" in page.read_text()
    assert (out / "plots" / "autointerp_by_layer.png").is_file()


def test_rare_features_read_more_held_out_text(tiny_run, tmp_path):
    """With a short study text most sampled features fire in too few fragments; reading more held-out text (up to
    analysis.max_extra_tokens) scores more of them, and meta.json says how much was read."""
    args = ["analysis=autointerp", "explainer=token_lookup", "analysis.n_features=8", "analysis.baselines=[]",
            "analysis.tokens=64", "eval_tokens=64", "analysis.min_fragments=3", "analysis.scorers=[detection]", *SMALL]
    unscorable = {}
    for extra in (0, 4096):
        out = tmp_path / f"extra{extra}"
        proc = run_in_process("evaluate.py", f"run={tiny_run}", f"out={out}", f"analysis.max_extra_tokens={extra}",
                              *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        meta = json.loads((out / "autointerp" / "meta.json").read_text())
        (info,) = meta["methods"]
        assert info["n_sampled_below_minimum"] > 0
        unscorable[extra] = meta["n_features_unscorable"]
    assert info["extra_tokens_read"] > 0 and info["n_sampled_below_minimum_after_extra"] == unscorable[4096]
    assert unscorable[4096] < unscorable[0]


def _byte_llama_dir(directory):
    """A randomly initialised 2-block Llama over bytes, saved as a model directory (no chat template: plain text)."""
    from autointerp_helpers import byte_backend

    backend = byte_backend()
    backend.lm.save_pretrained(directory)
    backend.tok.save_pretrained(directory)
    return directory


def test_hf_local_on_two_features(tiny_run, tmp_path):
    model_dir = _byte_llama_dir(tmp_path / "byte-llama")
    out = tmp_path / "eval"
    proc = run_cli("evaluate.py", f"run={tiny_run}", "analysis=autointerp", "explainer=hf_local",
                   f"explainer.model={model_dir}", "explainer.explain_max_tokens=4", "explainer.dtype=float32",
                   "analysis.n_features=2", "analysis.baselines=[]", "analysis.scorers=[simulation,detection]",
                   f"out={out}", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "autointerp" / "meta.json").read_text())
    assert meta["explainer"]["backend"] == "hf_local" and meta["explainer"]["params"]
    assert meta["n_features_scored"] + meta["n_features_unscorable"] == 2
    assert meta["cache"]["misses"] > 0 and meta["cache"]["path"] == str(out / "autointerp" / "cache.sqlite")
    assert {r["method"] for r in _summary(out)} == {"dictionary"}
    args = proc.args[2:]  # the same command again: refused without overwrite, then answered from the default cache
    again = run_in_process("evaluate.py", *args)
    assert again.returncode == 2 and "exists: pass analysis.overwrite=true" in again.stderr
    replay = run_in_process("evaluate.py", *args, "analysis.overwrite=true", "analysis.cache_mode=replay")
    assert replay.returncode == 0, replay.stderr[-3000:]
    meta = json.loads((out / "autointerp" / "meta.json").read_text())
    assert meta["cache"]["misses"] == 0 and meta["cache"]["hits"] > 0


def test_a_flipped_baseline_scores_the_same(tiny_run, tmp_path, monkeypatch):
    """A baseline direction's sign is arbitrary (eigh, FastICA, QR): both sides are scored, the one positively
    skewed on the fitting sample named ``i`` and the other ``d + i``, so -d scores exactly as d."""
    import sae.autointerp.analysis as analysis

    real = analysis.fit_baselines

    def flipped(*args, **kwargs):
        entries = real(*args, **kwargs)
        for e in entries:
            e.dictionary.set_atoms(-e.dictionary.W_dec)
        return entries

    args = ["analysis=autointerp", "explainer=token_lookup", "analysis.n_features=6", "analysis.baselines=[pca]",
            *SMALL]
    first = run_in_process("evaluate.py", f"run={tiny_run}", f"out={tmp_path / 'a'}", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    monkeypatch.setattr(analysis, "fit_baselines", flipped)
    second = run_in_process("evaluate.py", f"run={tiny_run}", f"out={tmp_path / 'b'}", *args)
    assert second.returncode == 0, second.stderr[-3000:]

    def pca_rows(out):
        with open(out / "autointerp.csv", newline="") as fh:
            return [{k: v for k, v in r.items()} for r in csv.DictReader(fh) if r["method"] == "pca"]

    a, b = pca_rows(tmp_path / "a"), pca_rows(tmp_path / "b")
    assert a and a == b
    (pca,) = [m for m in json.loads((tmp_path / "a" / "autointerp" / "meta.json").read_text())["methods"]
              if m["method"] == "pca"]
    assert pca["n_features"] == 2 * pca["n_directions"]  # each direction on both of its sides
    sides = run_cli("experiments/autointerp_sides.py", str(tmp_path / "a"), "--scores", "simulation")
    assert sides.returncode == 0, sides.stderr[-2000:]
    rows = [line.split(" | ") for line in sides.stdout.splitlines()[2:]]
    assert rows and {r[1] for r in rows} == {"pca"} and {r[2] for r in rows} <= {"heavy tail", "other side"}
    scored = [r for r in a if r["simulation"] not in ("", "nan")]
    assert sum(int(r[3].rsplit("(", 1)[1].rstrip(") |")) for r in rows) == len(scored)  # each on one side


def _dead_copy(run, tmp_path):
    """The run with every code forced to zero (encoder bias far below any pre-activation)."""
    dead = tmp_path / "dead"
    shutil.copytree(run, dead)
    weights = load_file(dead / "sae.safetensors")
    weights["b_enc"] = torch.full_like(weights["b_enc"], -1e9)
    save_file(weights, dead / "sae.safetensors")
    return dead


@pytest.mark.parametrize("case", ["unknown_scorer", "embedding_model"])
def test_bad_scorers_are_one_line_and_write_nothing(case, tiny_run, tmp_path):
    extra = (["analysis.scorers=[simulation,bogus]"] if case == "unknown_scorer" else
             ["analysis.scorers=[embedding]", "analysis.embedding_model=no-such-embedding-model"])
    out = tmp_path / "eval"
    proc = run_in_process("evaluate.py", f"run={tiny_run}", "analysis=autointerp", f"out={out}", *SMALL, *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and ("bogus" in line if case == "unknown_scorer" else "embedding" in line)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", ["unknown_method", "no_live_features", "chat_only_simulate", "missing_key",
                                  "unreachable"])
def test_bad_input_is_one_line(case, tiny_run, tmp_path):
    run, extra, env = tiny_run, [], {}
    chat = [
        "explainer=openai",
        "explainer.base_url=http://127.0.0.1:9/v1",
        "explainer.model=m",
        "explainer.api_key_env=null",
    ]
    if case == "unknown_method":
        extra, expected = ["analysis.baselines=[pca,nmf]"], "unknown baselines ['nmf']"
    elif case == "no_live_features":
        run, extra, expected = _dead_copy(tiny_run, tmp_path), ["analysis.baselines=[]"], "no live features"
    elif case == "chat_only_simulate":
        extra, expected = [*chat, "explainer.completions=false", "analysis.scorers=[simulation]"], "simulation needs"
    elif case == "missing_key":
        extra, expected = [*chat, "explainer.api_key_env=SAE_TEST_NO_SUCH_KEY"], "SAE_TEST_NO_SUCH_KEY"
        env = {"SAE_TEST_NO_SUCH_KEY": ""}
    else:
        extra, expected = chat, "cannot connect to 127.0.0.1:9"
    out = tmp_path / "eval"
    proc = run_cli("evaluate.py", f"run={run}", "analysis=autointerp", f"out={out}", *SMALL, *extra, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr[-2000:]
    assert not (out / "autointerp_summary.csv").exists() and not (out / "autointerp.csv").exists()
