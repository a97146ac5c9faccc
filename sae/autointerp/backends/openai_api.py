"""Any OpenAI-compatible endpoint (a hosted API, vLLM, llama.cpp) through the `openai` client.

The key is read from the environment variable the config names, at start-up, and kept only in the client.
Transient failures (connection, timeout, rate limit, 5xx) are retried with exponential backoff; requests run
`concurrency` at a time. Simulation needs `/v1/completions` with `echo` and `logprobs` (vLLM and llama.cpp
serve it; hosted chat APIs do not): `check_prompt_logprobs` probes for it once and says so in one line.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sae.autointerp.backends.base import (
    ChatRequest,
    ChatResponse,
    LLMBackend,
    LogprobRequest,
    PromptLogprobs,
    SimulationUnsupported,
    add_logprob,
)
from sae.errors import ConfigError

T = TypeVar("T")


class EndpointRefused(ConfigError):
    """The endpoint answered with an error status (kept, so a probe can tell 'no such route' from the rest)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def read_key(api_key_env: str | None) -> str:
    """The key from the named variable; a placeholder when none is named (local servers usually want none)."""
    if not api_key_env:
        return "EMPTY"
    key = os.environ.get(api_key_env, "")
    if not key:
        raise ConfigError(f"explainer.api_key_env={api_key_env}: that environment variable is not set (export the "
                          f"key there; it is never written to disk), or set explainer.api_key_env=null for a "
                          f"server that needs none")
    return key


class OpenAIBackend(LLMBackend):
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 4,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        timeout_s: float = 120.0,
        completions: str | bool = "auto",
        top_logprobs: int = 20,
        prefill: bool = False,
        chat_template_kwargs: dict | None = None,
    ):
        try:
            import openai
        except ImportError as err:
            raise ConfigError("explainer=openai needs the `openai` package: pip install -e \".[autointerp]\"") from err
        self._openai = openai
        self.model, self.endpoint = model, base_url
        self.batch_size = self.concurrency = max(1, int(concurrency))
        self.max_retries, self.backoff_s, self.top_logprobs = max(0, int(max_retries)), float(backoff_s), top_logprobs
        self.completions, self.prefill = completions, bool(prefill)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.client = openai.OpenAI(base_url=base_url, api_key=read_key(api_key_env), max_retries=0, timeout=timeout_s)

    @property
    def cache_tag(self) -> str:
        tag = "openai+prefill" if self.prefill else "openai"
        return tag + (f"+{sorted(self.chat_template_kwargs.items())}" if self.chat_template_kwargs else "")

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _retry(self, call: Callable[[], T]) -> T:
        """`call`, retried on transient errors with exponential backoff and jitter; others become one line."""
        o = self._openai
        transient = (o.APIConnectionError, o.RateLimitError, o.InternalServerError)
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except transient as err:
                if attempt == self.max_retries:
                    if isinstance(err, o.APIConnectionError):
                        raise ConfigError(
                            f"explainer.base_url={self.endpoint}: cannot reach it after "
                            f"{attempt + 1} tries ({type(err).__name__})"
                        ) from err
                    raise ConfigError(
                        f"explainer.base_url={self.endpoint}: still failing after {attempt + 1} tries "
                        f"({_one_line(err)})"
                    ) from err
                time.sleep(self.backoff_s * 2**attempt * (1 + 0.25 * random.random()))
            except o.AuthenticationError as err:
                raise ConfigError(
                    f"explainer.base_url={self.endpoint} rejected the API key ({_one_line(err)})"
                ) from err
            except o.APIStatusError as err:
                raise EndpointRefused(
                    f"explainer.base_url={self.endpoint}: request refused with status "
                    f"{err.status_code} ({_one_line(err)})",
                    err.status_code,
                ) from err
        raise AssertionError("unreachable")

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    # -- chat -----------------------------------------------------------------------------------------------------
    def _chat_one(self, req: ChatRequest) -> ChatResponse:
        extra: dict[str, Any] = (
            {"logprobs": True, "top_logprobs": min(req.top_logprobs, 20)} if req.top_logprobs else {}
        )
        messages = [{"role": r, "content": c} for r, c in req.messages]
        prefill = self.prefill and bool(req.prefix)
        body: dict[str, Any] = {}
        if prefill:  # vLLM's way to start the reply: a partial assistant message, continued
            messages.append({"role": "assistant", "content": req.prefix})
            body.update(continue_final_message=True, add_generation_prompt=False)
        if self.chat_template_kwargs:  # e.g. {"enable_thinking": false} for Qwen3 behind vLLM
            body["chat_template_kwargs"] = self.chat_template_kwargs
        if body:
            extra["extra_body"] = body
        resp = self._retry(lambda: self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=req.max_tokens, temperature=req.temperature, **extra))
        choice = resp.choices[0]
        table = None
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if req.top_logprobs and content:
            table = {}
            for alt in content[0].top_logprobs or []:
                add_logprob(table, alt.token, float(alt.logprob))
        text = choice.message.content or ""
        return ChatResponse(text=(req.prefix + text) if prefill else text, first_logprobs=table)

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        return self._map(self._chat_one, requests)

    # -- prompt log-probs -----------------------------------------------------------------------------------------
    def _echo(self, prompt: str, top: int):
        return self._retry(lambda: self.client.completions.create(
            model=self.model, prompt=prompt, echo=True, logprobs=top, max_tokens=1, temperature=0.0))

    def _logprobs_one(self, req: LogprobRequest) -> PromptLogprobs:
        lp = self._echo(req.prompt, min(req.top_logprobs, self.top_logprobs)).choices[0].logprobs
        n = sum(1 for off in lp.text_offset if off < len(req.prompt))  # drop the generated token
        top = [None if t is None else {str(k): float(v) for k, v in dict(t).items()} for t in lp.top_logprobs[:n]]
        return PromptLogprobs(tokens=list(lp.tokens[:n]), offsets=list(lp.text_offset[:n]), top=top)

    def prompt_logprobs(self, requests: Sequence[LogprobRequest]) -> list[PromptLogprobs]:
        self.check_prompt_logprobs()
        return self._map(self._logprobs_one, requests)

    def check_prompt_logprobs(self) -> None:
        refusal = (f"explainer.base_url={self.endpoint} (model {self.model}) serves no /v1/completions with echo and "
                   f"logprobs, which simulation needs (chat-only endpoints have no prompt log-probabilities); "
                   f"simulation is left out and detection and fuzzing score the explanations")
        if self.completions is False or self.completions == "false":
            raise SimulationUnsupported(refusal)
        if getattr(self, "_probed", False):
            return
        try:
            lp = self._echo("a b", 1).choices[0].logprobs
        except EndpointRefused as err:
            if err.status in (400, 404, 405, 422, 501):  # no such route, or echo/logprobs refused
                raise SimulationUnsupported(refusal) from err
            raise
        if lp is None or not getattr(lp, "text_offset", None) or not getattr(lp, "top_logprobs", None):
            raise SimulationUnsupported(refusal)
        self._probed = True


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
