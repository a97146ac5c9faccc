"""evaluate.py as a user runs it: a run, a sweep and a SAELens directory; baselines; every bad input."""

import csv
import json
import shutil

import pytest
from conftest import run_cli, run_in_process, tiny_overrides

from sae.evaluation.evaluate import COLUMNS

BASELINES = ["pca", "ica", "random", "neurons"]


def _rows(out, name: str = "eval.csv") -> list[dict]:
    with open(out / name) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def topk_run(tiny_lm_dir, tiny_text, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("topk-run")
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, run_dir), "sae=topk", "sae.k=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_with_all_baselines(topk_run):
    proc = run_cli("evaluate.py", f"run={topk_run}", f"analysis.baselines=[{','.join(BASELINES)}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = topk_run / "eval"
    rows = _rows(out)
    assert set(COLUMNS) <= set(rows[0]) and {"ce_mean_ablation", "ppl_spliced", "cosine", "dense_frac"} <= set(rows[0])
    kinds = sorted(r["kind"] for r in rows)
    assert kinds == sorted(["dictionary", *BASELINES, *(f"{b}_topk" for b in BASELINES)])
    for row in rows:
        assert json.loads((out / row["name"] / "eval.json").read_text())["kind"] == row["kind"]
        if row["kind"].endswith("_topk"):  # exactly the k codes of largest magnitude: the name's and the row's k
            assert float(row["l0"]) == float(row["k"]) == int(row["name"].rsplit("_topk", 1)[1])
    [matched] = _rows(out, "comparison.csv")
    dictionary = next(r for r in rows if r["kind"] == "dictionary")
    assert (
        matched["k"] == str(round(float(dictionary["l0"])))
        and matched["kl_spliced_dictionary"] == dictionary["kl_spliced"]
    )
    assert {f"kl_spliced_{b}_topk" for b in BASELINES} <= set(matched) and "kl_spliced: dict / ica-k" in proc.stdout
    pca = next(r for r in rows if r["kind"] == "pca")
    assert float(pca["fvu"]) < 1e-6 and float(pca["kl_spliced"]) < 1e-5
    for png in ("frontier.png", "by_layer.png", f"density/{topk_run.name}.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    # again into the same out without baselines: nothing of the first evaluation is left beside the new eval.csv
    again = run_cli("evaluate.py", f"run={topk_run}")
    assert again.returncode == 0 and len(_rows(out)) == 1  # saved baselines are not dictionaries
    assert not (out / "comparison.csv").exists() and not (out / "baselines").exists()
    assert [p.relative_to(out).as_posix() for p in out.rglob("eval.json")] == [f"{topk_run.name}/eval.json"]


def test_sweep(tiny_lm_dir, tiny_text, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_lm_dir, tiny_text, tmp_path) if not o.startswith("hydra.run")]
    proc = run_cli("train.py", "-m", *overrides, "hook.layer=0,2", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("evaluate.py", f"run={tmp_path}/sweep", "analysis.baselines=[pca]", "eval_tokens=256")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "sweep" / "eval")
    assert sorted((r["name"], r["layer"]) for r in rows if r["kind"] == "dictionary") == [("0", "0"), ("1", "2")]
    assert {r["layer"] for r in rows if r["kind"] == "pca"} == {"0", "2"}
    assert (tmp_path / "sweep" / "eval" / "plots" / "frontier.png").is_file()


def test_saelens_directory(topk_run, tiny_lm_dir, tiny_text, tmp_path):
    from sae.io.saelens import export_saelens

    export_saelens(topk_run, tmp_path / "lens")
    proc = run_cli("evaluate.py", f"run={tmp_path / 'lens'}", f"model.name_or_path={tiny_lm_dir}", "data.source=files",
                   f"data.path={tiny_text}", "data.context_length=32", "eval_tokens=512")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [lens] = _rows(tmp_path / "lens" / "eval")
    ours = json.loads((topk_run / "metrics.json").read_text())  # train.py's held-out metrics: same contexts
    assert float(lens["kl_spliced"]) == pytest.approx(ours["kl_spliced"], rel=1e-3)
    assert float(lens["l0"]) == pytest.approx(ours["l0"])


def _single_error(proc, message: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
        proc.stderr[-2000:]
    )


def test_no_dictionary(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    _single_error(run_in_process("evaluate.py", f"run={tmp_path}"), "no dictionary under")
    assert not (tmp_path / "eval").exists()


def test_width_mismatch(topk_run, tmp_path):
    shutil.copytree(topk_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval*", "checkpoints"))
    meta = json.loads((tmp_path / "run" / "sae.json").read_text())
    (tmp_path / "run" / "sae.json").write_text(json.dumps({**meta, "hook": {"layer": 1, "site": "mlp"}}))
    _single_error(run_in_process("evaluate.py", f"run={tmp_path / 'run'}"), "does not match layers.1.mlp")
    assert not (tmp_path / "run" / "eval").exists()


def test_unknown_baseline(topk_run):
    _single_error(
        run_in_process("evaluate.py", f"run={topk_run}", "analysis.baselines=[nmf]", f"out={topk_run}/bad"),
        "unknown baselines ['nmf']",
    )
    assert not (topk_run / "bad").exists()


def test_every_problem_in_one_line(topk_run, tmp_path):
    """Bad settings and a bad dictionary are all reported together, before any model runs."""
    shutil.copytree(topk_run, tmp_path / "run" / "a", ignore=shutil.ignore_patterns("eval*", "checkpoints"))
    meta = json.loads((tmp_path / "run" / "a" / "sae.json").read_text())
    (tmp_path / "run" / "a" / "sae.json").write_text(json.dumps({**meta, "hook": {"layer": 9, "site": "resid"}}))
    proc = run_in_process(
        "evaluate.py", f"run={tmp_path / 'run'}", "analysis.baselines=[nmf]", "eval_tokens=0", "baseline_tokens=0"
    )
    line = proc.stderr.strip().splitlines()
    _single_error(proc, "unknown baselines ['nmf']")
    for problem in ("eval_tokens=0 must be > 0", "baseline_tokens=0 must be > 0", "hook.layer=9 does not exist"):
        assert problem in line[0]
    assert not (tmp_path / "run" / "eval").exists()


def test_a_run_that_has_not_finished_is_not_evaluated(tmp_path):
    """A set killed while saving its members (or a run that failed after saving) holds dictionaries that look whole."""
    from omegaconf import OmegaConf

    from sae.errors import ConfigError
    from sae.evaluation.entries import check_finished, validate
    from sae.io.checkpoints import write_status

    member = tmp_path / "set" / "layer1"
    member.mkdir(parents=True)
    (member / "sae.json").write_text(json.dumps({"variant": "relu"}))  # found; refused before it is read
    write_status(tmp_path / "set", "running")
    cfg = OmegaConf.create({"run": str(tmp_path / "set"), "baseline_tokens": 1, "eval_tokens": None, "device": "cpu"})
    with pytest.raises(ConfigError, match=r"layer1: the run in .*set has not finished \(status: running\); resume it"):
        validate(cfg)
    write_status(tmp_path / "set", "finished")
    check_finished(member)
    write_status(member, "failed")  # a run's own status comes first
    with pytest.raises(ConfigError, match=r"has not finished \(status: failed\)"):
        check_finished(member)
    (member / "status.json").write_text("{")
    with pytest.raises(ConfigError, match="status.json is corrupt"):
        check_finished(member)


def test_each_hooks_unconverged_ica_is_named(capsys):
    import torch

    from sae.evaluation.entries import fit_noting_warnings
    from sae.lm.hooks import HookPoint

    gaussian = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))  # no independent components to find
    for layer in (0, 1):
        fit_noting_warnings("ica", gaussian, HookPoint(layer, "resid"), seed=0)
    err = capsys.readouterr().err
    assert (
        "warning: ica at layers.0.resid: FastICA did not converge in 200 iterations" in err and "layers.1.resid" in err
    )
