"""The typed schema of ``conf/evaluate.yaml``'s top level, registered with Hydra's ConfigStore.

The ``analysis`` group is open-ended (each study declares its own settings beside its ``_target_``); the
overrides of a dictionary's recorded ``model``, ``data`` and ``stream`` are typed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelOverrides:
    name_or_path: str | None = None
    dtype: str | None = None


@dataclass
class DataOverrides:
    source: str | None = None
    path: str | None = None
    text_column: str | None = None
    split: str | None = None
    context_length: int | None = None
    heldout_fraction: float | None = None


@dataclass
class StreamOverrides:
    lm_batch_size: int | None = None


@dataclass
class EvaluateConfig:
    run: str = MISSING
    """A run, dictionary, multirun sweep or SAELens directory; every dictionary under it is used."""
    out: str = MISSING
    """Where the study writes."""
    baseline_tokens: int = MISSING
    """Training activations the baselines are fitted on."""
    eval_tokens: int | None = MISSING
    """Held-out tokens (null: each dictionary's data.eval_tokens)."""
    device: str = MISSING
    """auto (CUDA when there is one), cpu or cuda."""
    seed: int = MISSING
    """ICA's and the random baseline's initialisation, the fitting sample's context order."""
    model: ModelOverrides = field(default_factory=ModelOverrides)
    data: DataOverrides = field(default_factory=DataOverrides)
    stream: StreamOverrides = field(default_factory=StreamOverrides)
    analysis: Any = MISSING
    """The study: conf/analysis/<name>.yaml (its _target_ and settings)."""
    task: Any = None
    """The prompt pairs of a study that needs a behaviour (analysis=patching): conf/task/<name>.yaml, or null."""
    target: Any = None
    """What analysis=circuits explains: ``<hook>:<index>``, or a mapping with one of feature, token, task."""
    explainer: Any = None
    """analysis=autointerp's explainer: conf/explainer/<backend>.yaml (untyped: each backend has its own keys)."""


MOVED = {
    "baselines": "analysis.baselines",
    "features.baselines": "analysis.baselines",
    "features.figures": "analysis.figures",
    **{
        f"features.settings.{k}": f"analysis.settings.{k}"
        for k in (
            "top_k",
            "window",
            "quantiles",
            "per_quantile",
            "min_count",
            "causal_contexts",
            "logit_tokens",
            "hist_tokens",
            "bins",
        )
    },
    "data.lm_batch_size": "stream.lm_batch_size",
}

ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
