"""The typed settings of ``analysis=probing`` (``conf/analysis/probing.yaml``), registered with Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class ProbingSettings:
    """k-sparse probing: per task, hook and method, a logistic regression on the k latents chosen by class-mean
    difference on the training split."""

    _target_: str = "sae.probing.study.study"
    """The study function ``evaluate.py`` calls."""
    tasks: list[str] = field(default_factory=list)
    """Each a JSONL file of ``{"text", "label"}`` lines, or a hub task by name (bias_in_bios, ag_news,
    amazon_reviews, europarl, github-code: downloaded, SAEBench's preprocessing)."""
    baselines: list[str] = field(default_factory=lambda: ["pca", "ica", "neurons", "random"])
    """Baselines fitted at each hook beside the dictionaries (``baseline_tokens`` training activations)."""
    raw: bool = True
    """Also probe the raw activations at the hook (SAEBench's ``llm`` rows)."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    """Numbers of latents a probe sees (a k above a method's width is skipped)."""
    dense: bool = True
    """Also probe all of a method's latents (``k=dense``)."""
    pooling: str = "mean"
    """How a text's latents are pooled over its ordinary tokens: ``mean`` (SAEBench) or ``max``."""
    seeds: int = 3
    """Train/test splits, each with its own seed; the interval is over them (t-distribution, 95%)."""
    test_fraction: float = 0.2
    """The share of each class held out for testing in each split."""
    max_tokens: int = 128
    """Tokens of a text read (the first ones, BOS excluded): SAEBench's context length."""
    max_per_class: int | None = None
    """Texts kept per class, a seeded sample (null: all); bounds the LM's work on a large task."""
    hub_per_class: int = 1250
    """Texts per class fetched for a hub task (SAEBench: 4,000 training + 1,000 test texts over a binary task)."""
    C: float = 1.0
    """The logistic regression's inverse L2 strength (scikit-learn's default, as SAEBench)."""
    max_iter: int = 1000
    """The logistic regression's iteration limit (SAEBench's)."""
    batch_size: int = 16
    """Texts per LM forward."""
    saebench: bool = True
    """Also write SAEBench-schema JSON (core and sparse probing) under ``<out>/saebench/``."""
    label: str | None = None
    """Shown on the figure, e.g. "stand-in LM neox-owt-14m" (null: the LM's name and size)."""


ConfigStore.instance().store(group="analysis", name="probing_schema", node=ProbingSettings)
