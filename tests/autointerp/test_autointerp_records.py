"""Records: normalisation, fragments cut from codes, the top/random draw, and the disjoint explain/score split."""

import pytest
import torch
from autointerp_helpers import planted_codes, word_decode

from sae.autointerp import (
    FeatureActivations,
    RecordConfig,
    build_records,
    cut_fragments,
    iter_feature_activations,
    normalise,
    sample_live_features,
)
from sae.autointerp.records import all_fragments
from sae.errors import ConfigError


def test_normalise_floor_relu_over_max():
    assert normalise([0.0, 0.5, 1.0, -3.0, 0.99, 0.1], 1.0) == [0, 5, 10, 0, 9, 1]
    assert normalise([0.25, 2.0], 2.0) == [1, 10]  # floor(1.25) = 1
    assert normalise([1.0, 2.0], 0.0) == [0, 0]  # a dead feature shows nothing, never divides by zero


def test_cut_fragments_keeps_requested_features_and_drops_remainders():
    codes = torch.arange(2 * 10 * 3, dtype=torch.float).reshape(2, 10, 3)
    ids = torch.arange(20).reshape(2, 10)
    acts, frag_ids = cut_fragments(codes, ids, [2, 0], fragment_len=4)
    assert acts.shape == (4, 4, 2) and frag_ids.shape == (4, 4)  # 2 fragments per context, 2 tokens dropped each
    assert frag_ids[2].tolist() == [10, 11, 12, 13]  # second context's first fragment
    assert acts[2, :, 0].tolist() == codes[1, :4, 2].tolist() and acts[2, :, 1].tolist() == codes[1, :4, 0].tolist()
    with pytest.raises(ConfigError, match="longer than the contexts"):
        cut_fragments(codes, ids, [0], fragment_len=11)
    with pytest.raises(ConfigError, match="out of range"):
        cut_fragments(codes, ids, [3], fragment_len=4)


def _hand_feature(n_frag=60, length=8):
    """Fragment i has max activation i (so the top ones are known), except multiples of 4 which are silent."""
    acts = torch.zeros(n_frag, length)
    for i in range(n_frag):
        if i % 4:
            acts[i, i % length] = float(i)
            acts[i, (i + 3) % length] = i / 3
    ids = torch.arange(n_frag * length).reshape(n_frag, length) % 20
    return FeatureActivations("dictionary", "blocks.0.hook_resid_post", 0, 7, acts, ids)


def test_split_is_disjoint_with_the_configured_sizes():
    cfg = RecordConfig(fragment_len=8, n_explain=4, n_score_top=6, n_score_random=7, n_score_random_active=3,
                       n_quantiles=3, per_quantile=2)
    rec = build_records(_hand_feature(), cfg, word_decode, seed=0)
    explain = {f.index for f in rec.explain}
    scored = {f.index for f in rec.score_top + rec.score_random + rec.score_random_active}
    assert (len(rec.explain), len(rec.score_top), len(rec.score_random)) == (4, 6, 7)
    assert explain.isdisjoint(scored), "explanation and scoring fragments must never overlap"
    assert len({f.index for f in rec.score_top + rec.score_random}) == 13  # no fragment scored twice either
    # the stride split: ranks 0, 2, 5, 7 of the top 10 (59 58 57 55 54 53 51 50 49 47) explained, the rest scored
    assert [f.index for f in rec.explain] == [59, 57, 53, 50]
    assert [f.index for f in rec.score_top] == [58, 55, 54, 51, 49, 47]
    top = explain | {f.index for f in rec.score_top}
    assert all(f.index % 4 and f.index not in top for f in rec.score_random_active)
    assert explain.isdisjoint(f.index for f in rec.positives)
    assert len(rec.positives) == 6 and len(rec.negatives) == 6
    assert all(max(f.acts) <= 0 for f in rec.negatives), "detection negatives: fragments where it does not fire"
    assert all(max(f.acts) > 0 for f in rec.positives)
    assert rec.max_act == 59.0 and rec.explain[0].norm[59 % 8] == 10
    assert rec.n_fragments == 60 and rec.density == pytest.approx(45 / 60)
    for frag in all_fragments(rec):  # one scale for all the feature's fragments
        assert frag.norm == normalise(frag.acts, 59.0)
    again = build_records(_hand_feature(), cfg, word_decode, seed=0)
    assert [f.index for f in again.score_random] == [f.index for f in rec.score_random]  # seeded
    other = build_records(_hand_feature(), cfg, word_decode, seed=1)
    assert [f.index for f in other.score_random] != [f.index for f in rec.score_random]


def test_the_random_scoring_fragments_are_uniform_over_the_text():
    """Bills et al. score on top fragments plus fragments drawn uniformly from the text, active or not."""
    cfg = RecordConfig(fragment_len=8, n_explain=2, n_score_top=2, n_score_random=5, n_score_random_active=0)
    fa = _hand_feature()  # 60 fragments, 15 silent; the top 4 go to explain/score_top, 56 remain eligible
    counts = torch.zeros(60)
    n_draws = 400
    for seed in range(n_draws):
        rec = build_records(fa, cfg, word_decode, seed=seed)
        for f in rec.score_random:
            counts[f.index] += 1
    top4 = [59, 58, 57, 55]
    assert counts[top4].sum() == 0
    eligible = [i for i in range(60) if i not in top4]
    expected = n_draws * 5 / len(eligible)  # about 35.7 draws each
    silent_share = counts[[i for i in eligible if i % 4 == 0]].sum() / counts.sum()
    assert silent_share == pytest.approx(15 / 56, abs=0.04), "silent fragments must be drawn as often as any other"
    assert counts[eligible].min() > expected * 0.5 and counts[eligible].max() < expected * 1.6


def test_paper_defaults_split_5_top_to_explain_and_5_top_plus_5_random_to_score():
    acts = torch.rand(100, 64) * (torch.rand(100, 64) < 0.2)
    rec = build_records(FeatureActivations("pca", "h", 1, 0, acts, torch.zeros(100, 64, dtype=torch.long)),
                        RecordConfig(), word_decode, seed=0)
    sizes = (len(rec.explain), len(rec.score_top), len(rec.score_random), len(rec.score_random_active))
    assert sizes == (5, 5, 5, 5) and {f.index for f in rec.explain}.isdisjoint(
        {f.index for f in rec.score_top + rec.score_random + rec.score_random_active})


def test_features_active_in_too_few_fragments_are_skipped():
    cfg = RecordConfig(fragment_len=8, n_explain=4, n_score_top=6, n_score_random=7)
    assert build_records(_hand_feature(n_frag=12), cfg, word_decode, seed=0) is None  # 9 active < 10 needed
    assert build_records(_hand_feature(n_frag=12), RecordConfig(fragment_len=8, min_fragments=2), word_decode, 0)


def test_bad_sizes_are_refused():
    with pytest.raises(ConfigError, match="n_explain and n_score_top"):
        RecordConfig(n_explain=0)


def test_live_feature_sampling_and_the_source():
    codes, ids = planted_codes()
    feats = sample_live_features(codes, n=10, seed=0)
    assert feats == [0, 1, 2]  # feature 3 never fires
    assert len(sample_live_features(codes, n=2, seed=0)) == 2
    with pytest.raises(ConfigError, match="no live features for pca at h"):
        sample_live_features(torch.zeros(2, 4, 3), n=5, seed=0, what="pca at h")
    items = list(iter_feature_activations("dictionary", "h", 2, codes, ids, feats, fragment_len=16))
    assert [fa.feature for fa in items] == feats and items[0].acts.shape == (48, 16)
    assert torch.equal(items[1].acts, codes[..., 1].reshape(48, 16))


def test_batched_collection_matches_the_whole_tensor_and_liveness_ors_over_batches():
    from sae.autointerp import collect_feature_activations, live_mask, sample_features

    codes, ids = planted_codes()
    mask = live_mask(codes[:12]) | live_mask(codes[12:])
    assert mask.tolist() == [True, True, True, False]
    feats = sample_features(mask, n=2, seed=3)
    whole = list(iter_feature_activations("m", "h", 0, codes, ids, feats, 16))
    batched = list(
        collect_feature_activations("m", "h", 0, [(codes[:10], ids[:10]), (codes[10:], ids[10:])], feats, 16)
    )
    assert all(torch.equal(a.acts, b.acts) and torch.equal(a.token_ids, b.token_ids) for a, b in zip(whole, batched))


def test_a_rare_feature_becomes_scorable_with_more_text_read_only_as_far_as_needed():
    """A planted rare feature fires once in the study's text and once every 4 contexts after it: its fragments are
    extended from the further text until it has the minimum, and no further batch is read; a frequent feature is
    left as it was."""
    from sae.autointerp import collect_feature_activations
    from sae.autointerp.records import extend_rare

    gen = torch.Generator().manual_seed(0)
    n_ctx, seq = 80, 16
    ids = torch.randint(0, 10, (n_ctx, seq), generator=gen)
    codes = torch.zeros(n_ctx, seq, 2)
    codes[..., 0] = (ids == 3).float()  # frequent: fires in most contexts
    codes[0, 5, 1] = 1.0  # rare: once in the study's 8 contexts ...
    codes[8::4, 2, 1] = 2.0  # ... and once every 4 contexts of the text after them
    cfg = RecordConfig(fragment_len=8, n_explain=2, n_score_top=2, n_score_random=2, n_score_random_active=0,
                       n_quantiles=1, per_quantile=1)
    base = list(collect_feature_activations("m", "h", 0, [(codes[:8], ids[:8])], [0, 1], 8))
    assert build_records(base[0], cfg, word_decode, seed=0) and build_records(base[1], cfg, word_decode, 0) is None
    read = []

    def more():
        for start in range(8, n_ctx, 8):  # 8 contexts a batch, 2 active fragments of the rare feature in each
            read.append(start)
            yield codes[start: start + 8], ids[start: start + 8]

    found = extend_rare(base, cfg.required, more(), fragment_len=8)
    assert found[0] is base[0]
    rec = build_records(found[1], cfg, word_decode, seed=0)
    assert rec is not None and found[1].acts.shape == (16 + 2 * 16, 8), "two more batches: 1 + 2 + 2 >= 4 active"
    assert len(read) == 2, "the text is read only as far as the rare feature needs"
    assert torch.equal(found[1].acts[16:], codes[8:24, :, 1].reshape(-1, 8))
    assert torch.equal(found[1].token_ids[16:], ids[8:24].reshape(-1, 8))
    short = extend_rare(base, cfg.required, iter([(codes[8:12], ids[8:12])]), fragment_len=8)
    assert build_records(short[1], cfg, word_decode, seed=0) is None, "a cap too small leaves it unscorable"


def test_a_dense_feature_is_contrasted_strong_against_weak_and_a_sparse_one_against_silence():
    """Silent in under ``min_silent_fraction`` of the fragments (here 1 in 30): negatives are the weaker half of the
    active fragments, every one weaker than every positive; silent in more: negatives are silent fragments."""
    torch.manual_seed(0)
    acts = torch.rand(60, 8) + 0.01
    acts[::30] = -1.0  # two silent fragments of 60
    fa = FeatureActivations("pca", "h", 0, 1, acts, torch.randint(0, 20, (60, 8)))
    cfg = RecordConfig(fragment_len=8, n_quantiles=3, per_quantile=3)
    rec = build_records(fa, cfg, word_decode, seed=0)
    assert len(rec.negatives) == len(rec.positives) == 9
    assert min(f.max_act for f in rec.negatives) > 0
    assert max(f.max_act for f in rec.negatives) <= min(f.max_act for f in rec.positives)
    peaks = sorted(acts.amax(1)[acts.amax(1) > 0].tolist())
    assert max(f.max_act for f in rec.negatives) <= peaks[len(peaks) // 2 - 1]  # from the weaker half
    sparse = build_records(fa, RecordConfig(fragment_len=8, n_quantiles=3, per_quantile=1, min_silent_fraction=0.02),
                           word_decode, seed=0)
    assert [max(f.acts) for f in sparse.negatives] == [-1.0, -1.0]
