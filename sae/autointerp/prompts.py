"""Prompt text for explaining, simulating, detecting and fuzzing, and the parsers of the answers.

The wording is this project's own. Chat prompts are lists of (role, content) pairs; the simulation prompt is
plain text (it is scored through prompt log-probabilities, not answered), with the character offset of every
placeholder whose predicted value is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sae.autointerp.records import Fragment

Messages = tuple[tuple[str, str], ...]

PLACEHOLDER = "?"
MARK_OPEN, MARK_CLOSE = "[[", "]]"
MAX_EXPLANATION_WORDS = 30
ANSWER_PREFIX = "Explanation:"  # prefilled as the reply's start where the backend can (a small model then keeps to it)

EXPLAIN_SYSTEM = (
    "You are helping to interpret the internals of a language model. One feature of the model was recorded on "
    "short passages of text. Each passage is shown one token per line: the token, a tab, then how strongly the "
    "feature responded to that token, from 0 (not at all) to 10 (its strongest response). Work out what the "
    "feature responds to."
)
EXPLAIN_ASK = "What does this feature respond to? Answer in one line, with a short phrase of at most a dozen words."
SIM_HEADER = (
    "Below, features of a language model are each described in a few words and then shown on a passage, one "
    "token per line: the token, a tab, and the feature's response to it, from 0 (none) to 10 (strongest).\n\n"
)
SIM_EXAMPLE = (
    ("The", 0), (" storm", 6), (" brought", 0), (" heavy", 1), (" rain", 10), (" and", 0), (" strong", 0),
    (" winds", 7), (" to", 0), (" the", 0), (" coast", 0), (".", 0),
)
SIM_EXAMPLE_EXPLANATION = "words about bad weather"
JUDGE_SYSTEM = "You check short descriptions of language-model features against passages of text. You answer yes or no."


def show_token(token: str) -> str:
    """A token as one line of a listing: newlines and tabs escaped so the line structure survives."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _listing(tokens: Sequence[str], values: Sequence[object]) -> str:
    return "\n".join(f"{show_token(t)}\t{v}" for t, v in zip(tokens, values))


def _passages(tokens_norms: Sequence[tuple[Sequence[str], Sequence[int]]], repeat_below: float) -> str:
    parts = [f"Passage {i + 1}:\n{_listing(t, n)}" for i, (t, n) in enumerate(tokens_norms)]
    n_tokens = sum(len(n) for _, n in tokens_norms)
    active = [(t, a) for toks, norms in tokens_norms for t, a in zip(toks, norms) if a > 0]
    if active and len(active) <= repeat_below * n_tokens:
        parts.append("Only the tokens with a non-zero response:\n" + _listing(*zip(*active)))
    return "\n\n".join(parts) + "\n\n" + EXPLAIN_ASK


def explanation_messages(fragments: Sequence[Fragment], repeat_below: float = 0.2) -> Messages:
    """The explainer's prompt: each fragment as token<TAB>activation lines.

    When few tokens are active (a fraction of at most `repeat_below`), the active ones are listed again on
    their own, so a rare response is not lost among dozens of zeros. No worked example: small models copy its
    answer (SmolLM2-135M answered every feature with the example's phrase).
    """
    return (("system", EXPLAIN_SYSTEM), ("user", _passages([(f.tokens, f.norm) for f in fragments], repeat_below)))


@dataclass(frozen=True)
class ParsedExplanation:
    text: str | None  # None: the answer could not be read as an explanation
    raw: str

    @property
    def ok(self) -> bool:
        return self.text is not None


REASONING = re.compile(r"<(think|thinking|reasoning)>.*?(</\1>|$)", flags=re.IGNORECASE | re.DOTALL)


def strip_reasoning(raw: str) -> str:
    """The answer without reasoning blocks (``<think>...</think>`` from Qwen3, DeepSeek-R1 and the like); a block
    left open (the model ran out of tokens while reasoning) removes everything after it."""
    text = REASONING.sub("", raw)
    return text.split("</think>")[-1] if "</think>" in text else text  # a template that opened <think> itself


def parse_explanation(raw: str) -> ParsedExplanation:
    """The phrase after 'Explanation:' (else the first non-empty line), tidied, reasoning blocks removed first;
    None when empty or rambling."""
    answer = strip_reasoning(raw)
    match = re.search(r"explanation[\s*_`]*[:\-]\s*(.*)", answer, flags=re.IGNORECASE)
    text = match.group(1) if match else answer
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    phrase = lines[0] if lines else ""
    phrase = phrase.strip(" \t*_`").rstrip(".").strip(" \t*_`")
    while len(phrase) >= 2 and phrase[0] == phrase[-1] and phrase[0] in "\"'":  # quoted as a whole
        phrase = phrase[1:-1].strip().rstrip(".")
    words = phrase.split()
    heading = phrase.endswith(":")  # an echoed heading of the prompt, not an answer
    if (
        not words
        or len(words) > MAX_EXPLANATION_WORDS
        or "\t" in phrase
        or heading
        or not re.search(r"[A-Za-z]", phrase)
    ):
        return ParsedExplanation(None, raw)
    return ParsedExplanation(phrase, raw)


@dataclass(frozen=True)
class SimulationPrompt:
    text: str
    positions: tuple[int, ...]  # character offset of each token's placeholder
    ten_offset: int = -1  # character offset of the worked example's "10": shows how the judge's tokenizer writes it


def simulation_prompt(explanation: str, tokens: Sequence[str]) -> SimulationPrompt:
    """A worked example, then the explanation and every token of the fragment with an unknown activation."""
    example = _listing([t for t, _ in SIM_EXAMPLE], [a for _, a in SIM_EXAMPLE])
    text = f"{SIM_HEADER}Feature: {SIM_EXAMPLE_EXPLANATION}\nPassage:\n{example}\n\nFeature: {explanation}\nPassage:\n"
    ten_offset = text.index("\t10\n") + 1
    positions = []
    for token in tokens:
        text += f"{show_token(token)}\t"
        positions.append(len(text))
        text += f"{PLACEHOLDER}\n"
    return SimulationPrompt(text, tuple(positions), ten_offset)


def passage_text(tokens: Sequence[str], marked: Sequence[bool] | None = None) -> str:
    """The fragment as running text; marked tokens wrapped in [[ ]] (inside any leading whitespace)."""
    out = []
    for i, token in enumerate(tokens):
        if marked is not None and marked[i]:
            body = token.lstrip()
            token = f"{token[: len(token) - len(body)]}{MARK_OPEN}{body}{MARK_CLOSE}"
        out.append(token)
    return "".join(out)


def detection_messages(explanation: str, tokens: Sequence[str]) -> Messages:
    user = (f"A feature of a language model is described as: {explanation}\n\nPassage:\n{passage_text(tokens)}\n\n"
            "Does the described feature respond to some part of this passage? Answer yes or no.")
    return (("system", JUDGE_SYSTEM), ("user", user))


def fuzzing_messages(explanation: str, tokens: Sequence[str], marked: Sequence[bool]) -> Messages:
    user = (f"A feature of a language model is described as: {explanation}\n\nIn the passage below, some tokens are "
            f"wrapped in {MARK_OPEN} {MARK_CLOSE}.\n\nPassage:\n{passage_text(tokens, marked)}\n\n"
            "Are the wrapped tokens the ones the described feature responds to? Answer yes or no.")
    return (("system", JUDGE_SYSTEM), ("user", user))


def parse_yes_no(raw: str) -> bool | None:
    """True/False from an answer's first word (after any reasoning block); None when it is neither yes nor no."""
    match = re.match(r"\W*(\w+)", strip_reasoning(raw))
    word = match.group(1).lower() if match else ""
    return True if word == "yes" else False if word == "no" else None


def render_plain(messages: Messages) -> str:
    """A chat as plain text, for models without a chat template."""
    return "".join(f"{role.capitalize()}: {content}\n\n" for role, content in messages) + "Assistant:"


def intruder_messages(explanation: str, passages: Sequence[Sequence[str]]) -> Messages:
    """Several passages, all but one where the described feature responds: which one is the intruder?"""
    listed = "\n\n".join(f"Passage {i + 1}:\n{passage_text(t)}" for i, t in enumerate(passages))
    user = (f"A feature of a language model is described as: {explanation}\n\nThe feature responds to every passage "
            f"below except one.\n\n{listed}\n\nWhich passage does the feature not respond to? Answer with its number "
            f"only.")
    return (("system", JUDGE_SYSTEM.replace("You answer yes or no.", "You answer briefly.")), ("user", user))


def parse_choice(raw: str, n: int) -> int | None:
    """The 0-based passage index from an answer's first number (1..n), after any reasoning block; None otherwise."""
    match = re.search(r"\d+", strip_reasoning(raw))
    value = int(match.group()) if match else 0
    return value - 1 if 1 <= value <= n else None
