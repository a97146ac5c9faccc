"""Feature patching on the tests' tiny GPT-NeoX, through the project's one splice (``sae.lm.splice``): the
intervention's identities, the attribution's gradient, the curves."""

import dataclasses
import random

import pytest
import torch
from conftest import WORDS, make_tokenizer, tiny_model

from sae.baselines import fit
from sae.circuits.curves import summarise
from sae.circuits.metrics import mean_kl
from sae.circuits.patching import CurveSettings, PatchingProblem, patching_curves
from sae.circuits.pruning import ranked
from sae.circuits.tasks import make_pair
from sae.dictionaries import build
from sae.errors import ConfigError
from sae.lm.hooks import HookPoint
from sae.lm.reader import token_mask
from sae.lm.splice import Replace, atoms_in_model_units, spliced_forward

HOOK = HookPoint(1, "resid")
SPECIAL = [0]  # the word tokenizer's <|endoftext|>: BOS of every prompt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny model (float64, so identities hold to rounding), 12 pairs of word sentences differing in one word."""
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("words"))
    model = tiny_model(layers=3).double()
    rng = random.Random(0)
    pairs = []
    for i in range(12):
        words = [rng.choice(WORDS) for _ in range(6 + i % 2)]  # two lengths: two batches at least
        other = list(words)
        other[2] = rng.choice([w for w in WORDS if w != words[2]])
        a, b = rng.sample(WORDS, 2)
        pairs.append(
            make_pair(tokenizer, " ".join(words), " ".join(other), a, b, where="t", order="ABBA" if i % 2 else "BABA")
        )
    return model, pairs


def problem_of(model, dictionary, pairs, batch_size):
    return PatchingProblem(model, SPECIAL, HOOK, dictionary, pairs, batch_size=batch_size)


def activations(model, ids):
    return spliced_forward(model, ids, {}, SPECIAL, read=[HOOK]).activations[HOOK]


def last_logits(model, ids, edits=None):
    return spliced_forward(model, ids, edits or {}, SPECIAL).logits[:, -1]


def test_identities_through_the_splice(setup):
    model, pairs = setup
    torch.manual_seed(0)
    dictionary = build("relu", 32, 64, l1_coeff=0.0).double()
    problem = problem_of(model, dictionary, pairs, 4)
    assert len(problem.batches) >= 3 and problem.n_features == 64
    none, everything = torch.zeros(64, dtype=torch.bool), torch.ones(64, dtype=torch.bool)
    for batch in problem.batches:
        ids = batch.pairs.base_ids
        keep = token_mask(ids, SPECIAL)
        assert not keep[:, 0].any() and keep[:, 1:].all()  # BOS first, then ordinary text
        x, x_cf = activations(model, ids), activations(model, batch.pairs.counterfactual_ids)
        # nothing patched: the base run exactly (and the edit changes nothing)
        logits, delta = problem.patched_logits(batch, none)
        assert torch.equal(logits, batch.base_logits) and not delta.any()  # the untouched splice, bit for bit
        assert torch.allclose(logits, model(input_ids=ids).logits[:, -1], atol=1e-12)  # = the plain model's run
        assert torch.equal(problem.patch(batch, none)(x, keep), x)
        # everything patched: the counterfactual's reconstruction plus the base run's error, at every ordinary position
        expected = dictionary.decode(dictionary.encode(x_cf)) + (x - dictionary.decode(dictionary.encode(x)))
        expected = torch.where(keep[..., None], expected, x)
        assert torch.allclose(problem.patch(batch, everything)(x, keep), expected, atol=1e-10)
        replaced = last_logits(model, ids, {HOOK: Replace(expected)})
        assert torch.allclose(problem.patched_logits(batch, everything)[0], replaced, atol=1e-10)
        # one feature: x moves only along that feature's atom (model units), by c̄_j − c_j
        j = int((batch.codes != batch.cf_codes).flatten(0, 1).any(0).nonzero()[0])
        e = torch.nn.functional.one_hot(torch.tensor(j), 64)
        atom = dictionary.decode(e.double()) - dictionary.decode(torch.zeros(64).double())
        single = problem.patch(batch, e.bool())(x, keep) - x
        step = (batch.cf_codes - batch.codes)[..., j] * keep
        assert torch.allclose(single, step[..., None] * atom, atol=1e-10) and single.abs().max() > 0
        # the measured edit is that change
        assert torch.allclose(problem.patched_logits(batch, e.bool())[1], single, atol=1e-12)
    base = torch.cat([model(input_ids=b.pairs.base_ids).logits[:, -1] for b in problem.batches])
    cf = torch.cat([model(input_ids=b.pairs.counterfactual_ids).logits[:, -1] for b in problem.batches])
    result = problem.unpatched(["all", "ABBA", "BABA"])
    assert result["all"]["kl"] == pytest.approx(float(mean_kl(base, cf).detach()), rel=1e-6)
    assert result["all"]["logit_diff_restored"] == pytest.approx(0.0, abs=1e-9)
    assert result["all"]["changed_positions"] == 0.0
    assert problem.kl(none) == pytest.approx(result["all"]["kl"])
    assert (result["ABBA"]["kl"] + result["BABA"]["kl"]) / 2 == pytest.approx(result["all"]["kl"])  # 6 pairs each


def test_full_patch_with_the_neuron_basis_is_the_counterfactual(setup):
    """An exact basis has no error: patching every coordinate is the counterfactual run, KL 0 and LD fully restored."""
    model, pairs = setup
    sample = torch.cat([activations(model, torch.tensor([p.base_ids]))[0, 1:] for p in pairs])
    neurons = fit("neurons", sample.float()).double()
    problem = problem_of(model, neurons, pairs, 8)
    result = problem.evaluate(torch.ones(32, dtype=torch.bool))["all"]
    assert result["kl"] == pytest.approx(0.0, abs=1e-9) and result["logit_diff_restored"] == pytest.approx(1.0)
    assert result["edit_per_changed_position"] > 0


def test_attribution_is_the_gradient(setup):
    """Signed attribution = d KL / d t of patching t (c̄_j − c_j) at t = 0 (central finite differences)."""
    model, pairs = setup
    torch.manual_seed(1)
    dictionary = build("relu", 32, 64, l1_coeff=0.0).double()
    with torch.no_grad():
        dictionary.b_enc[:4] = -1e3  # four features that never fire
    problem = problem_of(model, dictionary, pairs, 5)
    signed = problem.attribution("effect")
    assert torch.equal(problem.attribution("magnitude"), signed.abs())
    assert torch.equal(problem.attribution("signed"), -signed)  # most KL-reducing first
    t = 1e-4
    for j in signed.abs().topk(3).indices.tolist():
        e = torch.nn.functional.one_hot(torch.tensor(j), 64).double()
        numeric = (problem.kl(t * e) - problem.kl(-t * e)) / (2 * t)
        assert float(signed[j]) == pytest.approx(numeric, rel=1e-3)
    dead = ~problem.live()
    assert dead[:4].all() and (signed[dead] == 0).all()  # a feature equal in both runs has no attribution


def test_curves_end_to_end(setup):
    model, pairs = setup
    torch.manual_seed(0)
    problem = problem_of(model, build("relu", 32, 64, l1_coeff=0.0).double(), pairs, 8)
    settings = CurveSettings(orderings=("greedy", "attribution"), thresholds=(1e-4, 1e-2, 1.0), sizes=None, points=5)
    messages = []
    rows = patching_curves(
        problem, settings, method="relu", hook=HOOK.name, model="tiny test model", progress=messages.append
    )
    keys = {(r["ordering"], r["order"]) for r in rows}
    assert keys == {(o, g) for o in ("greedy", "attribution") for g in ("all", "ABBA", "BABA")}
    greedy = [r for r in rows if r["ordering"] == "greedy" and r["order"] == "all"]
    live = int(problem.live().sum())
    assert [r["n_features"] for r in greedy][0] == live and [r["threshold"] for r in greedy] == [None, 1e-4, 1e-2, 1.0]
    sizes = [r["n_features"] for r in greedy]
    assert sizes == sorted(sizes, reverse=True) and greedy[0]["unpatched_kl"] < 1.0
    # at tau = 1 every un-patch raises the KL by less than the whole unpatched KL: nothing is left patched
    assert sizes[-1] == 0 and greedy[-1]["kl"] == pytest.approx(greedy[0]["unpatched_kl"])
    assert len(messages) == 3 and all(r["model"] == "tiny test model" for r in rows)
    attribution = [r for r in rows if r["ordering"] == "attribution" and r["order"] == "all"]
    assert attribution[0]["n_features"] == 0 and attribution[0]["kl"] == pytest.approx(attribution[0]["unpatched_kl"])
    assert attribution[-1]["n_features"] == live
    assert len(summarise(rows)) == 6
    each = patching_curves(problem, CurveSettings(orderings=("greedy",), thresholds=(1e-3,), select_on="each"),
                           method="relu", hook=HOOK.name)
    assert {r["order"] for r in each} == {"all", "ABBA", "BABA"} and len(each) == 6
    fast = patching_curves(problem, dataclasses.replace(settings, lookahead=7), method="relu", hook=HOOK.name,
                           model="tiny test model")
    assert [(r["n_features"], r["order"], r["ordering"]) for r in fast] == [
        (r["n_features"], r["order"], r["ordering"]) for r in rows
    ]
    assert [r["kl"] for r in fast] == pytest.approx([r["kl"] for r in rows], rel=1e-9, abs=1e-12)
    masks = [torch.rand(64) < 0.5 for _ in range(3)]
    assert problem.kl_many(masks, "ABBA") == pytest.approx([problem.kl(m, "ABBA") for m in masks], rel=1e-9)
    capped = patching_curves(problem, CurveSettings(orderings=("greedy",), orders=("all",), thresholds=(1e-3,),
                                                    max_candidates=5), method="relu", hook=HOOK.name)
    assert capped[0]["n_features"] == 5


def test_attribution_curve_runs_one_pass_per_point(setup, monkeypatch):
    """Each attribution point's KL comes from the same pass as its other metrics (the unpatched run, then one pass
    per grid size, per batch of pairs), and equals ``problem.kl`` of the same set."""
    model, pairs = setup
    torch.manual_seed(0)
    problem = problem_of(model, build("relu", 32, 64, l1_coeff=0.0).double(), pairs, 8)
    calls = []
    forward = problem.patched_logits
    monkeypatch.setattr(problem, "patched_logits", lambda *a, **k: calls.append(1) or forward(*a, **k))
    rows = patching_curves(problem, CurveSettings(orderings=("attribution",), sizes=(0, 2, 5)), method="relu",
                           hook=HOOK.name)
    assert len(calls) == (1 + 3) * len(problem.batches)
    scores, live = problem.attribution("signed"), problem.live()
    top = torch.zeros(64, dtype=torch.bool)
    top[ranked(scores, live)[:5]] = True
    assert [r["kl"] for r in rows if r["order"] == "all"][-1] == pytest.approx(problem.kl(top), rel=1e-9)

def test_settings_from_the_config(hydra_app):
    """The YAML's defaults: attribution (signed) and its random control; greedy opt-in; ranges still checked."""
    settings = CurveSettings.from_settings(patching_settings())
    assert len(settings.thresholds) == 50 and settings.thresholds[0] == pytest.approx(1e-5)
    assert settings.orders == ("all", "ABBA", "BABA") and settings.orderings == ("attribution", "random")
    assert settings.rankings == ("signed",) and settings.max_candidates == 64
    with pytest.raises(ConfigError, match="unknown \\['sideways'\\]"):
        CurveSettings.from_settings(patching_settings("analysis.orderings=[sideways]"))
    with pytest.raises(ConfigError, match="select_on"):
        CurveSettings.from_settings(patching_settings("analysis.select_on=some"))
    with pytest.raises(ConfigError, match="rankings"):
        CurveSettings.from_settings(patching_settings("analysis.rankings=[loud]"))


def patching_settings(*overrides: str):
    from conftest import compose_config

    from sae.evaluation.studies import settings_of

    return settings_of(compose_config(["analysis=patching", *overrides], "evaluate"))


def _planted_problem(model, pairs):
    """The neuron basis on the pairs, and the signed effect of patching each coordinate alone (the KL's first-order
    change): coordinates whose patch raises the KL exist on these random pairs, the planted features."""
    sample = torch.cat([activations(model, torch.tensor([p.base_ids]))[0, 1:] for p in pairs])
    problem = problem_of(model, fit("neurons", sample.float()).double(), pairs, 8)
    return problem, problem.attribution("effect")


def test_signed_ranking_puts_a_kl_raising_feature_last(setup):
    """Patched alone, the feature predicted to raise the KL most does raise it; signed ranking puts it after every
    feature predicted to lower the KL, magnitude ranking does not."""
    model, pairs = setup
    problem, effect = _planted_problem(model, pairs)
    live = problem.live()
    raiser = int(torch.where(live, effect, torch.tensor(-torch.inf)).argmax())
    assert effect[raiser] > 0  # a KL-raising feature exists here
    alone = torch.zeros(problem.n_features, dtype=torch.bool)
    alone[raiser] = True
    assert problem.kl(alone) > problem.kl(torch.zeros_like(alone))  # and patching it does raise the KL
    signed, magnitude = ranked(problem.attribution("signed"), live), ranked(problem.attribution("magnitude"), live)
    assert signed[-1] == raiser
    assert magnitude.index(raiser) < int((live & (effect < 0)).sum())  # by |effect| it ranks among the reducers
    rows = patching_curves(problem, CurveSettings(orderings=("attribution",), rankings=("signed", "magnitude"),
                                                  orders=("all",), sizes=(1,)), method="neurons", hook=HOOK.name)
    first = {r["ranking"]: r["kl"] for r in rows if r["n_features"] == 1}
    assert first["signed"] < first["magnitude"] or signed[0] == magnitude[0]


def test_edit_size_over_the_changed_positions(setup):
    """One coordinate of the neuron basis patched: the edit is (c̄_j − c_j) at every position where they differ; its
    size per changed position is the hand value, the unchanged positions (BOS, the shared prefix) left out."""
    model, pairs = setup
    problem, _ = _planted_problem(model, pairs)
    j = int(problem.live().nonzero()[0])
    mask = torch.zeros(problem.n_features, dtype=torch.bool)
    mask[j] = True
    total, count = 0.0, 0
    for batch in problem.batches:
        differs = (batch.codes[..., j] != batch.cf_codes[..., j]) & token_mask(batch.pairs.base_ids, SPECIAL)
        step = (batch.cf_codes[..., j] - batch.codes[..., j]).abs()
        atom = float(atoms_in_model_units(problem.dictionary)[j].norm())  # ||x' - x|| = |c̄_j - c_j| ||d_j||
        total, count = total + float(step[differs].sum()) * atom, count + int(differs.sum())
        assert not differs[:, :3].any()  # BOS and the two words both prompts share
    result = problem.evaluate(mask)["all"]
    assert count > 0 and result["edit_per_changed_position"] == pytest.approx(total / count, rel=1e-9)
    assert result["changed_positions"] == pytest.approx(count / problem.n_pairs)


def test_random_ordering_is_the_control(setup):
    """The random curve patches as many random live features as each attribution point, reproducibly by seed."""
    model, pairs = setup
    torch.manual_seed(0)
    problem = problem_of(model, build("relu", 32, 64, l1_coeff=0.0).double(), pairs, 8)
    settings = CurveSettings(orders=("all",), sizes=(0, 3, 10))
    rows = patching_curves(problem, settings, method="relu", hook=HOOK.name)
    by = {o: [r["n_features"] for r in rows if r["ordering"] == o] for o in ("attribution", "random")}
    assert by["attribution"] == by["random"] == [0, 3, 10]
    again = patching_curves(problem, settings, method="relu", hook=HOOK.name)
    assert [r["kl"] for r in again] == [r["kl"] for r in rows]
    other = patching_curves(problem, dataclasses.replace(settings, random_seed=1), method="relu", hook=HOOK.name)
    assert [r["kl"] for r in other if r["ordering"] == "random"] != [r["kl"] for r in rows if r["ordering"] == "random"]


def test_outputs(setup, tmp_path):
    from sae.circuits.curves import read_rows
    from sae.circuits.patching import write_outputs

    model, pairs = setup
    torch.manual_seed(0)
    problem = problem_of(model, build("relu", 32, 64, l1_coeff=0.0).double(), pairs, 8)
    rows = patching_curves(problem, CurveSettings(orderings=("greedy", "attribution", "random"), thresholds=(1e-3, 1.0),
                                                  points=4), method="relu", hook=HOOK.name)
    written = write_outputs(rows, tmp_path, "tiny test model; word pairs")
    assert len(read_rows(written["curves"])) == len(rows) and len(read_rows(written["summary"])) == 9
    assert [p.name for p in written["plots"]] == ["patching_layers.1.resid.png"] and written["plots"][
        0
    ].stat().st_size > 0
