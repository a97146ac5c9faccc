"""Scores on known numbers: expected value, Pearson over concatenation, oracle/constant simulators, classifiers,
bootstrap; and the prompts and their parsers."""

import math

import numpy as np
import pytest
import torch
from autointerp_helpers import word_decode

from sae.autointerp import FeatureActivations, RecordConfig, build_records, prompts
from sae.autointerp.interpret import Interpreter, Judgement, p_yes
from sae.autointerp.scoring import auroc, balanced_accuracy, bootstrap_ci, expected_value, pearson, simulation_scores
from sae.autointerp.study import StudyConfig, fuzz_cases, score_variant


def test_expected_value_over_digit_tokens():
    ln = math.log
    assert expected_value({"0": ln(0.5), "10": ln(0.5)}) == pytest.approx(5.0)
    assert expected_value({" 3": ln(0.1), "3": ln(0.1), "7": ln(0.2), "x": ln(0.6)}) == pytest.approx(
        (3 * 0.2 + 7 * 0.2) / 0.4
    )
    assert math.isnan(expected_value({"cat": -0.1})) and math.isnan(expected_value(None))


def test_pearson_is_over_the_concatenation_not_an_average():
    true_top, sim_top = [[0, 10, 0], [0, 8, 2]], [[0, 9, 1], [1, 7, 1]]
    true_rand, sim_rand = [[0, 1, 0]], [[5, 6, 5]]
    s = simulation_scores(true_top, sim_top, true_rand, sim_rand)
    concat = np.corrcoef([0, 10, 0, 0, 8, 2, 0, 1, 0], [0, 9, 1, 1, 7, 1, 5, 6, 5])[0, 1]
    assert s["all"] == pytest.approx(concat)
    assert s["top"] == pytest.approx(np.corrcoef([0, 10, 0, 0, 8, 2], [0, 9, 1, 1, 7, 1])[0, 1])
    assert s["random"] == pytest.approx(1.0)
    assert s["all"] != pytest.approx((s["top"] + s["random"]) / 2)
    assert pearson([1, 2, 3, math.nan], [2, 4, 6, 100]) == pytest.approx(1.0)  # unknown predictions dropped pairwise


class Oracle(Interpreter):
    """Returns the true activations (or a constant): the two ends a correlation score must get right."""

    def __init__(self, constant=None):
        self.constant = constant

    def simulate(self, jobs):
        return [[self.constant if self.constant is not None else max(a, 0) for a in f.acts] for _, f in jobs]


def _record(density: float = 0.3):
    """A feature firing on ``density`` of the tokens (0.3: on nearly every 16-token fragment, a dense one)."""
    acts = torch.rand(80, 16) * (torch.rand(80, 16) < density)
    fa = FeatureActivations("dictionary", "h", 0, 3, acts, torch.randint(0, 20, (80, 16)))
    return build_records(fa, RecordConfig(fragment_len=16), word_decode, seed=0)


def test_oracle_simulator_scores_one_and_a_constant_one_is_undefined():
    torch.manual_seed(0)
    rec = _record()
    (oracle,) = score_variant(Oracle(), [rec], [None], ["simulation"], cfg=StudyConfig())
    assert oracle["simulation"] == pytest.approx(1.0) and oracle["simulation_top"] == pytest.approx(1.0)
    (flat,) = score_variant(Oracle(constant=3.0), [rec], [None], ["simulation"], cfg=StudyConfig())
    assert math.isnan(flat["simulation"]) and math.isnan(flat["simulation_random"])
    missing = simulation_scores([[1, 2]], [None], [[0, 1]], [None])
    assert all(math.isnan(v) for v in missing.values())


def test_balanced_accuracy_and_auroc_by_hand():
    labels = [True, True, True, False, False]
    assert balanced_accuracy(labels, [True, True, False, False, True]) == pytest.approx(0.5 * (2 / 3 + 1 / 2))
    assert balanced_accuracy(labels, [True, True, True, None, None]) == pytest.approx(0.5)  # unreadable = wrong
    assert math.isnan(balanced_accuracy([True, True], [True, False]))
    assert auroc(labels, [0.9, 0.8, 0.3, 0.3, 0.1]) == pytest.approx((2 + 2 + 1.5) / 6)
    assert auroc(labels, [0.9, 0.8, 0.7, 0.2, math.nan]) == pytest.approx(1.0)
    assert math.isnan(auroc([True], [0.3]))
    assert p_yes({" Yes": math.log(0.3), "no": math.log(0.1), "maybe": math.log(0.6)}) == pytest.approx(0.75)


class Perfect(Interpreter):
    """A judge that knows the truth: detection says yes to active fragments, fuzzing to correct marks."""

    def detect(self, jobs):
        return [Judgement(f.max_act > 0, 1.0 if f.max_act > 0 else 0.0) for _, f in jobs]

    def fuzz(self, jobs):
        good = [all(a > 0 for a, m in zip(f.acts, marks) if m) for _, f, marks in jobs]
        return [Judgement(g, float(g)) for g in good]


def test_detection_and_fuzzing_cases_are_balanced_and_a_perfect_judge_scores_one():
    """On a sparse feature (silent in most fragments, so detection's negatives are silent ones), a judge that knows
    where it fires scores 1."""
    torch.manual_seed(1)
    rec = _record(density=0.04)
    assert all(f.max_act <= 0 for f in rec.negatives)
    cases = fuzz_cases(rec, seed=0)
    assert sum(lab for *_, lab in cases) == sum(not lab for *_, lab in cases) > 0
    for frag, marks, label in cases:
        assert sum(marks) > 0 and all((a > 0) == label for a, m in zip(frag.acts, marks) if m)
    (res,) = score_variant(Perfect(), [rec], [None], ["detection", "fuzzing"], cfg=StudyConfig())
    assert res["detection"] == res["detection_auroc"] == res["fuzzing"] == res["fuzzing_auroc"] == 1.0


def test_bootstrap_interval_brackets_the_mean_and_skips_undefined():
    ci = bootstrap_ci([0.1, 0.2, 0.3, 0.4, math.nan], n_boot=500, seed=0)
    assert ci["n"] == 4 and ci["n_undefined"] == 1
    assert ci["mean"] == pytest.approx(0.25) and ci["ci_low"] < 0.25 < ci["ci_high"]
    assert math.isnan(bootstrap_ci([math.nan])["mean"])


def test_explanation_prompt_lists_tokens_and_repeats_rare_activations():
    rec = _record()
    (system, user) = prompts.explanation_messages(rec.explain[:1], repeat_below=1.0)
    frag = rec.explain[0]
    assert f"{frag.tokens[0]}\t{frag.norm[0]}" in user[1]
    assert "Only the tokens with a non-zero response:" in user[1]  # few active tokens: listed again
    (_, user_dense) = prompts.explanation_messages(rec.explain[:1], repeat_below=0.0)
    assert "Only the tokens with a non-zero response:" not in user_dense[1]


def test_explanation_parsing_is_robust_and_records_failures():
    assert prompts.parse_explanation("Explanation: the word 'cat'.").text == "the word 'cat'"
    assert prompts.parse_explanation("Sure!\n**Explanation**: names of months\nMore text").text == "names of months"
    assert prompts.parse_explanation('  "animals in stories."  ').text == "animals in stories"
    for bad in [
        "",
        "   \n ",
        "123 456",
        "word " * 40,
        "cat\t3",
        "The tokens with a non-zero response, again:\n the\t10",
    ]:
        parsed = prompts.parse_explanation(bad)
        assert parsed.text is None and not parsed.ok and parsed.raw == bad
    assert prompts.parse_yes_no(" Yes.") is True and prompts.parse_yes_no("no") is False
    assert prompts.parse_yes_no("Maybe") is None


def test_simulation_prompt_points_at_each_placeholder():
    sim = prompts.simulation_prompt("the word cat", [" the", " cat\n", "\t"])
    assert len(sim.positions) == 3 and all(sim.text[p] == prompts.PLACEHOLDER for p in sim.positions)
    assert "the word cat" in sim.text and " cat\\n\t?" in sim.text  # newline escaped, line structure kept
    marked = prompts.passage_text([" a", " cat"], [False, True])
    assert marked == " a [[cat]]"
