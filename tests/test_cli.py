"""The command lines: a bad override, a value of the wrong type or a key that moved is one line, exit status 2."""

import pytest
from conftest import ROOT, run_cli

from sae.cli import command_line_problems
from sae.evaluation.config import MOVED as EVALUATE_MOVED
from sae.training.config import MOVED as TRAIN_MOVED

CONF = ROOT / "conf"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.tokens=abc", "train.tokens=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ("hook.layer=abc", "hook.layer=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (
            "data.context_length=1.5",
            "data.context_length=1.5: Value '1.5' of type 'float' could not be converted to Integer",
        ),
        ("train.devices=2", "train.devices moved to trainer.devices: write trainer.devices=2"),
        ("data.buffer_size=4096", "data.buffer_size moved to stream.buffer_size: write stream.buffer_size=4096"),
        ("train.bogus=1", "'train.bogus' is not a setting here"),
    ],
)
def test_train_overrides(override, message):
    problems = command_line_problems(CONF, "config", [override], TRAIN_MOVED)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_every_problem_of_a_command_line_and_of_a_sweep_in_one_list():
    problems = command_line_problems(
        CONF, "config", ["train.tokens=abc", "hook.layer=1,x", "train.lr=0.01"], TRAIN_MOVED
    )
    assert problems == ["train.tokens=abc: Value 'abc' of type 'str' could not be converted to Integer",
                        "hook.layer=x: Value 'x' of type 'str' could not be converted to Integer"]
    assert command_line_problems(CONF, "config", ["hook.layer=0,1,2", "experiment=toy", "sae=topk"], TRAIN_MOVED) == []


@pytest.mark.parametrize("override,message", [
    ("baselines=[pca]", "baselines moved to analysis.baselines: write analysis.baselines=[pca]"),
    ("features.figures=2", "features.figures moved to analysis.figures: write analysis.figures=2"),
    ("eval_tokens=lots", "eval_tokens=lots: Value 'lots' of type 'str' could not be converted to Integer"),
])
def test_evaluate_overrides(override, message):
    assert command_line_problems(CONF, "evaluate", ["run=x", override], EVALUATE_MOVED) == [message]


def test_entry_points_print_one_line_and_exit_2(tmp_path):
    proc = run_cli("train.py", "train.tokens=abc", "train.devices=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert (
        proc.stderr.startswith("error: train.tokens=abc: ") and "train.devices moved to trainer.devices" in proc.stderr
    )
    assert not any(tmp_path.iterdir())  # nothing was started
    proc = run_cli("evaluate.py", f"run={tmp_path}", "baselines=[pca]")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: baselines moved to analysis.baselines: write analysis.baselines=[pca]")


def test_pythia410m_preset_offline_is_one_line(tmp_path):
    """Real Pythia loads from the hub for users; here (offline) the preset's first job stops with one line."""
    proc = run_cli("train.py", "experiment=pythia410m_resid_sweep", "logger=csv", f"hydra.sweep.dir={tmp_path}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot load model 'EleutherAI/pythia-410m-deduped'" in lines[-1] and "offline" in lines[-1]
