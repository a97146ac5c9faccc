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
    """Overrides of the model each dictionary's sae.json records (null: as recorded)."""

    name_or_path: str | None = None
    """Another hub id or model directory for the recorded model (e.g. a local copy)."""
    dtype: str | None = None
    """The LM's weights: float32, bfloat16 or float16."""


@dataclass
class DataOverrides:
    """Overrides of the text each dictionary's sae.json records (null: as recorded)."""

    source: str | None = None
    """files or hub."""
    path: str | None = None
    """A file or glob, or a hub dataset id."""
    text_column: str | None = None
    """The column holding the text."""
    split: str | None = None
    """The dataset split (hub datasets)."""
    context_length: int | None = None
    """Tokens per context, BOS included."""
    heldout_fraction: float | None = None
    """The fraction of documents held out; keep the training run's to evaluate on text it never saw."""


@dataclass
class StreamOverrides:
    """Overrides of the recorded stream settings (null: as recorded)."""

    lm_batch_size: int | None = None
    """Contexts per LM forward."""


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
