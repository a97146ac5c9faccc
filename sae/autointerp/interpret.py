"""Interpreters: explain a feature, simulate it from the explanation, and judge passages (detection, fuzzing).

`LLMInterpreter` does all four with any LLMBackend (through its cache); the LLM-free `TokenLookup` lives in
backends/token_lookup.py. The study only talks to this interface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sae.autointerp import prompts
from sae.autointerp.backends.base import BranchRequest, ChatRequest, LLMBackend, LogprobRequest, PromptLogprobs
from sae.autointerp.records import FeatureRecords, Fragment
from sae.autointerp.scoring import DIGITS, digit_share, expected_value

YES_NO = ("yes", "no")
TEN_MIN_SHARE = 1e-3  # P('0'|'1') used only where P("1") is at least this share of the digit mass (error <= 0.009)
TEN_ONE_TOKEN = "0-10 scale; '10' is one token of the judge's tokenizer, read in one step"
TEN_TWO_TOKENS = ("0-10 scale; the judge's tokenizer writes '10' as '1','0': P(10) = P('1')·P('0'|'1'), the second "
                  "factor read in the prompt's own forward (a branch token per position) where the backend folds it, "
                  f"else from a second batched step (where P('1') >= {TEN_MIN_SHARE} of the digit mass)")


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

    def intruder(self, jobs: Sequence[tuple[Explanation, Sequence[Fragment]]]) -> list[int | None]:
        """For each (explanation, passages): the index of the passage the explanation does not fit (None: no answer)."""
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
        self.ten_rule: str | None = None  # how "10" is read, known after the first simulation (meta.json)

    def explain(self, records: Sequence[FeatureRecords]) -> list[Explanation]:
        reqs = [ChatRequest(prompts.explanation_messages(r.explain, self.repeat_below), self.explain_max_tokens,
                            prefix=prompts.ANSWER_PREFIX) for r in records]
        out = []
        for resp in self.backend.chat(reqs):
            parsed = prompts.parse_explanation(resp.text)
            out.append(Explanation(parsed.text, parsed.raw))
        return out

    def simulate(self, jobs: Sequence[tuple[Explanation, Fragment]]) -> list[list[float] | None]:
        """Expected 0-10 value at every token, all tokens of a fragment read from one prompt (all at once). Where the
        judge writes "10" as two tokens, P("0" | "1") at each position comes from the same forward (backends that
        fold a branch into it) or from a second batched step (the others)."""
        todo = [i for i, (e, _) in enumerate(jobs) if e.text is not None]
        built = {i: prompts.simulation_prompt(jobs[i][0].text, jobs[i][1].tokens) for i in todo}
        out: list[list[float] | None] = [None] * len(jobs)
        if not todo:
            return out
        resps = self._simulation_logprobs(built, todo)
        split = self.ten_rule == TEN_TWO_TOKENS
        if split and not self.backend.folds_branches:
            zero_after_one = self._zero_after_one(built, resps)
        else:
            zero_after_one = {(i, p): _zero_prob(table) for i, resp in resps.items() if resp.branch_tables
                              for p, table in zip(built[i].positions, resp.branch_tables)
                              if _needs_ten(resp.at(p))}
        for i, resp in resps.items():
            out[i] = [expected_value(resp.at(p), zero_after_one.get((i, p))) for p in built[i].positions]
        return out

    def _simulation_logprobs(self, built: dict, todo: list[int]) -> dict[int, PromptLogprobs]:
        """The prompts' log-probs; the first call reads one prompt alone first, to learn how the judge's tokenizer
        writes "10" (the rule kept for meta.json), so that where it splits, the branch is asked for with the rest."""
        resps: dict[int, PromptLogprobs] = {}
        if self.ten_rule is None:
            first = todo[0]
            (resps[first],) = self.backend.prompt_logprobs([self._sim_request(built[first], "")])
            split = not _one_token_ten(resps[first], built[first].ten_offset)
            self.ten_rule = TEN_TWO_TOKENS if split else TEN_ONE_TOKEN
            if split and self.backend.folds_branches:
                del resps[first]  # asked again, with its branch
        branch = "1" if self.ten_rule == TEN_TWO_TOKENS and self.backend.folds_branches else ""
        rest = [i for i in todo if i not in resps]
        reqs = [self._sim_request(built[i], branch) for i in rest]
        resps.update(zip(rest, self.backend.prompt_logprobs(reqs) if reqs else []))
        return resps

    def _sim_request(self, built: prompts.SimulationPrompt, branch: str) -> LogprobRequest:
        return LogprobRequest(built.text, built.positions, self.top_logprobs, DIGITS, branch)

    def _zero_after_one(self, built: dict, resps: dict[int, PromptLogprobs]) -> dict[tuple[int, int], float]:
        """P("0" | the prompt up to the placeholder, "1") at every position where "1" has some mass: one batched
        call of branch requests (one per fragment, every such position in it)."""
        wanted = {i: tuple(p for p in built[i].positions if _needs_ten(resp.at(p))) for i, resp in resps.items()}
        jobs = [i for i in resps if wanted[i]]
        reqs = [BranchRequest(built[i].text, wanted[i], "1", ("0",), self.top_logprobs) for i in jobs]
        found: dict[tuple[int, int], float] = {}
        for i, resp in zip(jobs, self.backend.branch_logprobs(reqs) if reqs else []):
            for p, table in zip(wanted[i], resp.tables):
                found[(i, p)] = _zero_prob(table)
        return found

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

    def intruder(self, jobs: Sequence[tuple[Explanation, Sequence[Fragment]]]) -> list[int | None]:
        """The passage number the judge picks: the most likely of "1".."k" as the first answer token, else the
        first number in its answer."""
        todo = [i for i, (e, _) in enumerate(jobs) if e.text is not None]
        reqs = []
        for i in todo:
            expl, frags = jobs[i]
            numbers = tuple(str(k + 1) for k in range(len(frags)))
            reqs.append(ChatRequest(prompts.intruder_messages(expl.text, [f.tokens for f in frags]),
                                    self.judge_max_tokens, top_logprobs=self.top_logprobs, candidates=numbers))
        out: list[int | None] = [None] * len(jobs)
        for i, resp in zip(todo, self.backend.chat(reqs) if reqs else []):
            n = len(jobs[i][1])
            mass = [0.0] * n
            for token, logprob in (resp.first_logprobs or {}).items():
                key = token.strip()
                if key.isdigit() and 1 <= int(key) <= n and math.isfinite(logprob):
                    mass[int(key) - 1] += math.exp(logprob)
            out[i] = max(range(n), key=lambda k: mass[k]) if max(mass) > 0 else prompts.parse_choice(resp.text, n)
        return out

    def check_simulation(self) -> None:
        self.backend.check_prompt_logprobs()

    def describe(self) -> dict:
        return {**self.backend.describe(), **({"scale": self.ten_rule} if self.ten_rule else {})}


def _needs_ten(table: dict[str, float] | None) -> bool:
    """Whether "1" holds enough of the digit mass at a position for P("0" | "1") to be read there."""
    return digit_share(table, "1") >= TEN_MIN_SHARE


def _zero_prob(table: dict[str, float] | None) -> float:
    """P("0") from a branch's table (0 where absent)."""
    logprob = (table or {}).get("0")
    return math.exp(logprob) if logprob is not None and math.isfinite(logprob) else 0.0


def _one_token_ten(resp: PromptLogprobs, ten_offset: int) -> bool:
    """Whether the judge's tokenizer wrote the worked example's "10" as one token (read from the prompt's tokens)."""
    token = resp.token_at(ten_offset) if ten_offset >= 0 else None
    return token is not None and token.strip().startswith("10")
