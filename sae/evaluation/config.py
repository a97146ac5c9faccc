"""The typed schema of ``conf/evaluate.yaml``'s top level and of the studies of this package (``analysis=metrics``,
``analysis=residue``), registered with Hydra's ConfigStore.

Each study's settings are a dataclass registered in the ``analysis`` group (``<study>_schema``) by the study's own
package (``sae/circuits/config.py``, ``sae/features/config.py``, ...), which ``evaluate.py`` imports before Hydra
composes; ``conf/analysis/<study>.yaml`` names it first in its ``defaults:`` and holds the values. The overrides of a
dictionary's recorded ``model``, ``data`` and ``stream`` are typed here: ``data.*`` are the text settings
(``sae.lm.text_settings.TextSettings``), each nullable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sae.lm.text_settings import TextSettings


@dataclass
class ModelOverrides:
    """Overrides of the model each dictionary's sae.json records (null: as recorded)."""

    name_or_path: str | None = None
    """Another hub id or model directory for the recorded model (e.g. a local copy)."""
    dtype: str | None = None
    """The LM's weights: float32, bfloat16 or float16."""


def _nullable(settings: type, name: str, doc: str) -> type:
    """A dataclass with every field of ``settings``, typed ``T | None`` and null by default (null: keep the recorded
    value)."""
    hints = get_type_hints(settings)
    # Optional[...]: the type is built at run time from a hint, where ``X | None`` needs X to be a class
    made = make_dataclass(name, [(f.name, Optional[hints[f.name]], field(default=None))  # noqa: UP045
                                 for f in fields(settings)])
    made.__doc__ = doc
    made.__doc_source__ = settings  # where the configuration reference finds each field's docstring
    return made


DataOverrides = _nullable(TextSettings, "DataOverrides",
                          "The text settings (sae.lm.text_settings.TextSettings): a non-null one replaces the "
                          "dictionary's recorded value.")


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


@dataclass
class MetricsSettings:
    """``analysis=metrics`` (conf/analysis/metrics.yaml)."""

    _target_: str = MISSING
    """The study function."""
    baselines: list[str] = MISSING
    """Any of pca, ica, random, neurons, fitted at each hook; each also top-k sparsified to every dictionary's L0."""


@dataclass
class ResidueSettings:
    """``analysis=residue`` (conf/analysis/residue.yaml)."""

    _target_: str = MISSING
    """The study function."""
    top: int = MISSING
    """Tokens kept per dictionary, highest KL first."""
    window: int = MISSING
    """Context tokens shown either side."""
    predictions: int = MISSING
    """Clean and spliced top predictions shown."""
    share_frac: float = MISSING
    """The concentration: the share of the total KL carried by this top fraction of tokens."""
    batch_size: int = MISSING
    """Held-out contexts per forward (two forwards each: clean and spliced)."""


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
ConfigStore.instance().store(group="analysis", name="metrics_schema", node=MetricsSettings)
ConfigStore.instance().store(group="analysis", name="residue_schema", node=ResidueSettings)
