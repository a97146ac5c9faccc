"""What every LLM backend answers: batched chat completions, and prompt log-probabilities (for simulation).

Requests and responses are plain dataclasses that round-trip through JSON, so the SQLite cache can sit in
front of any backend (`CachedBackend`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from sae.autointerp.cache import ResponseCache
from sae.errors import ConfigError


class SimulationUnsupported(ConfigError):
    """The backend cannot return prompt log-probabilities, which simulation needs."""


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    temperature: float = 0.0
    top_logprobs: int = 0  # > 0: also return the first generated token's most likely alternatives
    candidates: tuple[str, ...] = ()  # first-token strings whose log-probs are wanted exactly, where possible
    prefix: str = ""  # the start of the reply, where the backend can prefill it (in-process models); else ignored

    def to_json(self) -> dict:
        return {**asdict(self), "messages": [list(m) for m in self.messages], "candidates": list(self.candidates)}


@dataclass
class ChatResponse:
    text: str
    first_logprobs: dict[str, float] | None = None


@dataclass(frozen=True)
class LogprobRequest:
    """Log-probs of the distribution predicting the prompt's tokens at the given character offsets; with ``branch``,
    also at each offset p the next-token distribution after ``prompt[:p] + branch`` (e.g. P("0" | ..., "1") for a
    two-token "10"), answered only by backends that fold it into the same forward (``LLMBackend.folds_branches``)."""

    prompt: str
    positions: tuple[int, ...]
    top_logprobs: int = 20
    candidates: tuple[str, ...] = ()
    branch: str = ""

    def to_json(self) -> dict:
        out = {**asdict(self), "positions": list(self.positions), "candidates": list(self.candidates)}
        if not self.branch:  # requests without a branch keep the keys they had in existing caches
            del out["branch"]
        return out


@dataclass(frozen=True)
class BranchRequest:
    """For each character offset p: the next-token distribution after ``prompt[:p] + text`` (the prompt cut at p
    and ``text`` written there), e.g. P("0" | ..., "1") to read a two-token "10"."""

    prompt: str
    positions: tuple[int, ...]
    text: str
    candidates: tuple[str, ...] = ()
    top_logprobs: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "positions": list(self.positions), "candidates": list(self.candidates)}


@dataclass
class BranchLogprobs:
    """One table per requested position (None where it could not be computed)."""

    tables: list[dict[str, float] | None]


@dataclass
class PromptLogprobs:
    """Per prompt token: its text, its character offset, and the distribution it was drawn from (or None)."""

    tokens: list[str]
    offsets: list[int]
    top: list[dict[str, float] | None] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)  # of each token itself, where computed
    branch_tables: list[dict[str, float] | None] | None = None  # per requested position, for a request's branch

    def at(self, position: int) -> dict[str, float] | None:
        """The distribution of the token covering character `position`."""
        i = bisect.bisect_right(self.offsets, position) - 1
        return self.top[i] if 0 <= i < len(self.top) else None

    def token_at(self, position: int) -> str | None:
        """The text of the prompt token covering character `position`."""
        i = bisect.bisect_right(self.offsets, position) - 1
        return self.tokens[i] if 0 <= i < len(self.tokens) else None


def add_logprob(table: dict[str, float], key: str, value: float) -> None:
    """Merge two entries for one string (two token ids may decode alike) by adding their probabilities."""
    old = table.get(key)
    table[key] = value if old is None else max(old, value) + math.log1p(math.exp(-abs(old - value)))


class LLMBackend:
    """Base class: name, model, endpoint for provenance, and the two batched calls."""

    name = "llm"
    model = ""
    endpoint: str | None = None
    batch_size = 8
    folds_branches = False  # True: prompt_logprobs answers a request's branch from the prompt's own forward

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        raise NotImplementedError

    def prompt_logprobs(self, requests: Sequence[LogprobRequest]) -> list[PromptLogprobs]:
        raise NotImplementedError

    def branch_logprobs(self, requests: Sequence[BranchRequest]) -> list[BranchLogprobs]:
        """Generic: one prompt-log-prob request per position (``prompt[:p] + text + "\\n"``, read at the newline),
        all sent as one batch. In-process backends override it with one forward per request."""
        flat = [(r, p) for r in requests for p in r.positions]
        reqs = [LogprobRequest(r.prompt[:p] + r.text + "\n", (p + len(r.text),), r.top_logprobs, r.candidates)
                for r, p in flat]
        tables = [resp.at(p + len(r.text)) for (r, p), resp in zip(flat, self.prompt_logprobs(reqs) if reqs else [])]
        out, k = [], 0
        for r in requests:
            out.append(BranchLogprobs(tables[k: k + len(r.positions)]))
            k += len(r.positions)
        return out

    def check_prompt_logprobs(self) -> None:
        """Raise SimulationUnsupported (one line) when this backend has no prompt log-probs."""

    @property
    def cache_tag(self) -> str:
        """The backend part of cache keys: its name, plus any setting that changes answers to the same request."""
        return self.name

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model, "endpoint": self.endpoint}


class CachedBackend(LLMBackend):
    """The same calls, through a ResponseCache keyed by backend, model, request kind and request."""

    def __init__(self, inner: LLMBackend, cache: ResponseCache):
        self.inner, self.cache = inner, cache
        self.name, self.model, self.endpoint, self.batch_size = (
            inner.name,
            inner.model,
            inner.endpoint,
            inner.batch_size,
        )
        self.folds_branches = inner.folds_branches

    def _through(self, kind: str, requests: Sequence, compute, decode) -> list:
        out = self.cache.through(self.inner.cache_tag, self.model, kind, [r.to_json() for r in requests],
                                 lambda idx: [asdict(r) for r in compute([requests[i] for i in idx])],
                                 chunk=self.batch_size)
        return [decode(o) for o in out]

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        return self._through("chat", requests, self.inner.chat, lambda o: ChatResponse(**o))

    def prompt_logprobs(self, requests: Sequence[LogprobRequest]) -> list[PromptLogprobs]:
        return self._through("prompt_logprobs", requests, self.inner.prompt_logprobs, lambda o: PromptLogprobs(**o))

    def branch_logprobs(self, requests: Sequence[BranchRequest]) -> list[BranchLogprobs]:
        return self._through("branch_logprobs", requests, self.inner.branch_logprobs, lambda o: BranchLogprobs(**o))

    def check_prompt_logprobs(self) -> None:
        """The inner check, its outcome cached too, so a replay needs no endpoint at all."""
        def probe(_: list[int]) -> list[dict]:
            try:
                self.inner.check_prompt_logprobs()
            except SimulationUnsupported as err:
                return [{"ok": False, "reason": str(err)}]
            return [{"ok": True, "reason": ""}]

        (outcome,) = self.cache.through(
            self.inner.cache_tag, self.model, "probe", [{"probe": "prompt_logprobs"}], probe
        )
        if not outcome["ok"]:
            raise SimulationUnsupported(outcome["reason"])

    def describe(self) -> dict:
        return self.inner.describe()
