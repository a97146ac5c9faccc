"""Automatic interpretation (explain -> simulate -> score) of any features, from tensors of codes.

The public surface an entry point needs:

    from sae.autointerp import (sample_live_features, iter_feature_activations, decoder_from_tokenizer,
                                run_from_config)

    def source():                                  # one (method, hook) at a time: codes need not all fit at once
        for method, hook, layer, codes, ids in ...:  # codes [n_contexts, seq, n_features], ids [n_contexts, seq]
            feats = sample_live_features(codes, n=50, seed=0, what=f"{method} at {hook}")
            yield from iter_feature_activations(method, hook, layer, codes, ids, feats, fragment_len=64)

    run_from_config(source(), decoder_from_tokenizer(tokenizer), out_dir, cfg.autointerp, cfg.explainer)

When a method's codes do not fit in memory at once, OR `live_mask(codes)` over batches, pick features with
`sample_features(mask, n, seed)`, then `collect_feature_activations(method, hook, layer, batches, feats)` keeps
only those features' activations from each (codes, token_ids) batch.
"""

from sae.autointerp.records import (
                                    NORMALISATION_RULE,
                                    FeatureActivations,
                                    FeatureRecords,
                                    Fragment,
                                    RecordConfig,
                                    build_records,
                                    collect_feature_activations,
                                    cut_fragments,
                                    decoder_from_tokenizer,
                                    iter_feature_activations,
                                    live_features,
                                    live_mask,
                                    normalise,
                                    sample_features,
                                    sample_live_features,
)
from sae.autointerp.study import StudyConfig, StudyResult, output_paths, run_from_config, run_study, study_config

__all__ = ["NORMALISATION_RULE", "FeatureActivations", "FeatureRecords", "Fragment", "RecordConfig", "StudyConfig",
           "StudyResult", "build_records", "collect_feature_activations", "cut_fragments", "decoder_from_tokenizer",
           "iter_feature_activations", "live_features", "live_mask", "normalise", "output_paths", "run_from_config",
           "run_study", "sample_features", "sample_live_features", "study_config"]
