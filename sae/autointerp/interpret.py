"""Interpreters: explain a feature, simulate it from the explanation, and judge passages (detection, fuzzing).

`LLMInterpreter` does all four with any LLMBackend (through its cache); the LLM-free `TokenLookup` lives in
backends/token_lookup.py. The study only talks to this interface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sae.autointerp import prompts
from sae.autointerp.backends.base import ChatRequest, LLMBackend, LogprobRequest
from sae.autointerp.records import FeatureRecords, Fragment
from sae.autointerp.scoring import DIGITS, expected_value

YES_NO = ("yes", "no")


@dataclass
class Explanation:
    text: str | None  # None: the explainer's answer could not be parsed
    raw: str
    lookup: dict[str, float] | None = field(default=None, repr=False)  # the token-lookup explainer's table

    def to_json(self) -> dict:
        return {"text": self.text, "raw": self.raw, "parsed": self.text is not None}


@dataclass
class Judgement:
    answer: bool | None  # None: neither yes nor no
    p_yes: float = math.nan  # P(yes) / (P(yes) + P(no)) from the first answer token, where log-probs exist


class Interpreter:
    """Base: every method takes a batch, so backends can batch across features."""

    name = "interpreter"

    def explain(self, records: Sequence[FeatureRecords]) -> list[Explanation]:
        raise NotImplementedError

    def simulate(self, jobs: Sequence[tuple[Explanation, Fragment]]) -> list[list[float] | None]:
        raise NotImplementedError

    def detect(self, jobs: Sequence[tuple[Explanation, Fragment]]) -> list[Judgement]:
        raise NotImplementedError

    def fuzz(self, jobs: Sequence[tuple[Explanation, Fragment, Sequence[bool]]]) -> list[Judgement]:
        raise NotImplementedError

    def check_simulation(self) -> None:
        """Raise SimulationUnsupported when simulation is impossible here."""

    def describe(self) -> dict:
        return {"backend": self.name}


def p_yes(table: dict[str, float] | None) -> float:
    """P(yes) renormalised over yes/no from a first-token table (case and spaces ignored); NaN when neither."""
    if not table:
        return math.nan
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in table.items():
        key = token.strip().lower()
        if key in mass and math.isfinite(logprob):
            mass[key] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else math.nan


class LLMInterpreter(Interpreter):
    """Explanation, all-at-once simulation and yes/no judgements through one LLM backend."""

    def __init__(self, backend: LLMBackend, explain_max_tokens: int = 48, top_logprobs: int = 20,
                 repeat_below: float = 0.2, judge_max_tokens: int = 3):
        self.backend, self.name = backend, backend.name
        self.explain_max_tokens, self.top_logprobs = explain_max_tokens, top_logprobs
        self.repeat_below, self.judge_max_tokens = repeat_below, judge_max_tokens

    def explain(self, records: Sequence[FeatureRecords]) -> list[Explanation]:
        reqs = [ChatRequest(prompts.explanation_messages(r.explain, self.repeat_below), self.explain_max_tokens,
                            prefix=prompts.ANSWER_PREFIX) for r in records]
        out = []
        for resp in self.backend.chat(reqs):
            parsed = prompts.parse_explanation(resp.text)
            out.append(Explanation(parsed.text, parsed.raw))
        return out

    def simulate(self, jobs: Sequence[tuple[Explanation, Fragment]]) -> list[list[float] | None]:
        todo = [i for i, (e, _) in enumerate(jobs) if e.text is not None]
        built = {i: prompts.simulation_prompt(jobs[i][0].text, jobs[i][1].tokens) for i in todo}
        reqs = [LogprobRequest(built[i].text, built[i].positions, self.top_logprobs, DIGITS) for i in todo]
        out: list[list[float] | None] = [None] * len(jobs)
        for i, resp in zip(todo, self.backend.prompt_logprobs(reqs) if reqs else []):
            out[i] = [expected_value(resp.at(p)) for p in built[i].positions]
        return out

    def _judge(self, messages: list[prompts.Messages | None]) -> list[Judgement]:
        todo = [i for i, m in enumerate(messages) if m is not None]
        reqs = [ChatRequest(messages[i], self.judge_max_tokens, top_logprobs=self.top_logprobs, candidates=YES_NO)
                for i in todo]
        out = [Judgement(None) for _ in messages]
        for i, resp in zip(todo, self.backend.chat(reqs) if reqs else []):
            answer, prob = prompts.parse_yes_no(resp.text), p_yes(resp.first_logprobs)
            if answer is None and math.isfinite(prob):
                answer = prob >= 0.5
            out[i] = Judgement(answer, prob)
        return out

    def detect(self, jobs: Sequence[tuple[Explanation, Fragment]]) -> list[Judgement]:
        return self._judge([None if e.text is None else prompts.detection_messages(e.text, f.tokens) for e, f in jobs])

    def fuzz(self, jobs: Sequence[tuple[Explanation, Fragment, Sequence[bool]]]) -> list[Judgement]:
        return self._judge([None if e.text is None else prompts.fuzzing_messages(e.text, f.tokens, m)
                            for e, f, m in jobs])

    def check_simulation(self) -> None:
        self.backend.check_prompt_logprobs()

    def describe(self) -> dict:
        return self.backend.describe()
