"""Typed settings of ``analysis=features`` (``conf/analysis/features.yaml``), registered with Hydra's ConfigStore as
training's groups are: the YAML names the schema first in its ``defaults:`` and holds the values."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class CollectSettings:
    top_k: int = MISSING
    """Top-activating contexts kept per feature."""
    window: int = MISSING
    """Tokens shown either side of the firing token."""
    quantiles: int = MISSING
    """Activation quantile bins sampled."""
    per_quantile: int = MISSING
    """Contexts sampled per bin."""
    min_count: int = MISSING
    """A feature is scored (live) when it fires on at least this many held-out tokens."""
    causal_contexts: int = MISSING
    """Top contexts on which the feature is ablated for its causal logit effect (one forward each, per feature)."""
    logit_tokens: int = MISSING
    """Tokens per logit table."""
    hist_tokens: int = MISSING
    """Tokens stacked in the activation histogram (the rest is "other")."""
    bins: int = MISSING
    """Bins of the activation histogram."""
    sample: int = MISSING
    """Firings kept per feature (a seeded uniform sample) to cut the quantile bins from: exact for a feature that
    fires at most this often, an estimate beyond."""
    causal_features: int | None = MISSING
    """Live features (a seeded sample) whose causal logit effect is measured, two forwards of causal_contexts
    contexts each; null: every live feature (hours at 32,768 features on a CPU)."""


@dataclass
class FeaturesSettings:
    """``analysis=features``: per-feature contexts, histograms and logit effects."""

    _target_: str = MISSING
    """The study function."""
    baselines: list[str] = MISSING
    """Baselines analysed beside the dictionaries, fitted at the same hooks (pca, ica, neurons, random)."""
    figures: int = MISSING
    """PNGs (figures/<method>/<feature>.png) of each method's most monosemantic features."""
    settings: CollectSettings = field(default_factory=CollectSettings)
    """How much is collected per feature."""


ConfigStore.instance().store(group="analysis", name="features_schema", node=FeaturesSettings)
