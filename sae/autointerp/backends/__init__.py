"""Explainer backends, built from the `explainer` config group: openai, hf_local, token_lookup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sae.autointerp.backends.base import (
    CachedBackend,
    ChatRequest,
    ChatResponse,
    LLMBackend,
    LogprobRequest,
    PromptLogprobs,
    SimulationUnsupported,
)
from sae.autointerp.cache import ResponseCache
from sae.errors import ConfigError

BACKENDS = ("openai", "hf_local", "token_lookup")


def make_backend(cfg: Mapping[str, Any], device: str = "cpu") -> LLMBackend:
    """The raw LLM backend named by cfg['backend'] (not cached)."""
    kind = cfg.get("backend")
    if kind == "openai":
        from sae.autointerp.backends.openai_api import OpenAIBackend

        if not cfg.get("base_url") or not cfg.get("model"):
            raise ConfigError("explainer=openai needs explainer.base_url and explainer.model")
        return OpenAIBackend(cfg["base_url"], cfg["model"], cfg.get("api_key_env"), cfg.get("concurrency", 4),
                             cfg.get("max_retries", 4), cfg.get("backoff_s", 1.0), cfg.get("timeout_s", 120.0),
                             cfg.get("completions", "auto"), cfg.get("top_logprobs", 20), cfg.get("prefill", False),
                             dict(cfg.get("chat_template_kwargs") or {}))
    if kind == "hf_local":
        from sae.autointerp.backends.hf_local import HFLocalBackend

        if not cfg.get("model"):
            raise ConfigError("explainer=hf_local needs explainer.model (a hub id, a directory or a .gguf file)")
        return HFLocalBackend.load(str(cfg["model"]), cfg.get("gguf_file"), cfg.get("batch_size", 8),
                                   cfg.get("device") or device, cfg.get("dtype", "auto"),
                                   dict(cfg.get("chat_template_kwargs") or {}))
    raise ConfigError(f"explainer.backend={kind!r}: expected one of {', '.join(BACKENDS)}")


def make_interpreter(cfg: Mapping[str, Any], cache: ResponseCache, device: str = "cpu"):
    """The study's Interpreter for cfg: token_lookup, or an LLM backend behind the response cache."""
    from sae.autointerp.interpret import LLMInterpreter  # here: interpret imports this package's base module

    if cfg.get("backend") == "token_lookup":
        from sae.autointerp.backends.token_lookup import TokenLookup

        return TokenLookup(cfg.get("n_shown", 5), cfg.get("threshold", 1.0))
    backend = CachedBackend(make_backend(cfg, device), cache)
    return LLMInterpreter(backend, cfg.get("explain_max_tokens", 48), cfg.get("top_logprobs", 20),
                          cfg.get("repeat_below", 0.2), cfg.get("judge_max_tokens", 3))


__all__ = ["BACKENDS", "CachedBackend", "ChatRequest", "ChatResponse", "LLMBackend", "LogprobRequest",
           "PromptLogprobs", "SimulationUnsupported", "make_backend", "make_interpreter"]
