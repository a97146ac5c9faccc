"""What a circuit explains, from the command line: a dictionary feature (``target=layers.5.resid:123``, or
``target=5:123`` for the residual stream), the feature that most predicts a token (``target.token='")"'``), or a
task's output metric (``target.task=logit_diff`` with ``task=ioi``); and the checks that make a bad target one line.

Parsing needs no model: the caller gives the hooks its dictionaries cover (``{hook name: n_features}``) and, for a
token target, the tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sae.errors import ConfigError

HOOK = re.compile(r"^layers\.(\d+)\.([a-z_]+)$")
TASK_METRICS = ("logit_diff", "kl")


@dataclass(frozen=True)
class FeatureTarget:
    hook: str  # e.g. layers.5.resid
    index: int

    @property
    def layer(self) -> int:
        return hook_layer(self.hook)

    @property
    def name(self) -> str:
        return f"{self.hook}:{self.index}"


@dataclass(frozen=True)
class TokenTarget:
    token: str
    token_id: int

    @property
    def name(self) -> str:
        return f"token {self.token!r}"


@dataclass(frozen=True)
class TaskTarget:
    metric: str

    @property
    def name(self) -> str:
        return f"task {self.metric}"


Target = FeatureTarget | TokenTarget | TaskTarget


def hook_layer(hook: str) -> int:
    match = HOOK.match(hook)
    if not match:
        raise ConfigError(f"hook {hook!r} is not of the form layers.<layer>.<site>")
    return int(match.group(1))


def _feature(spec: str) -> FeatureTarget:
    hook, sep, index = spec.rpartition(":")
    if not sep or not index.strip().lstrip("-").isdigit():
        raise ConfigError(f"target={spec!r}: give <hook>:<feature index>, e.g. layers.5.resid:123 (or 5:123)")
    hook = f"layers.{hook}.resid" if hook.isdigit() else hook
    hook_layer(hook)
    return FeatureTarget(hook, int(index))


def parse_target(spec, tokenizer=None) -> Target:
    """A target from ``target=<hook>:<index>`` (a string) or a mapping with one of ``feature``, ``token``, ``task``."""
    if isinstance(spec, str):
        return _feature(spec.strip())
    if not isinstance(spec, Mapping):
        raise ConfigError(
            "target is missing: give target=<hook>:<feature>, target.token='\")\"' or target.task=logit_diff"
        )
    given = {k: v for k, v in spec.items() if v not in (None, "")}
    if len(given) != 1 or next(iter(given)) not in ("feature", "token", "task"):
        raise ConfigError(
            f"give exactly one of target.feature, target.token, target.task (got {sorted(given) or 'none'})"
        )
    kind, value = next(iter(given.items()))
    if kind == "feature":
        return _feature(str(value))
    if kind == "task":
        if value not in TASK_METRICS:
            raise ConfigError(f"target.task={value!r}; use one of {list(TASK_METRICS)} (with task=ioi or task=pairs)")
        return TaskTarget(str(value))
    if tokenizer is None:
        raise ValueError("a token target needs the tokenizer")
    ids = tokenizer(str(value), add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"target.token={value!r} is {len(ids)} tokens for this tokenizer, not one; "
                          "give a single token (mind the leading space)")
    return TokenTarget(str(value), int(ids[0]))


def check_feature(target: FeatureTarget, widths: Mapping[str, int]) -> None:
    """The target's hook has a dictionary and its index is one of that dictionary's features."""
    if target.hook not in widths:
        raise ConfigError(f"target hook {target.hook} has no dictionary in this run; hooks: {sorted(widths)}")
    if not 0 <= target.index < widths[target.hook]:
        raise ConfigError(f"target feature {target.index} is out of range: {target.hook}'s dictionary has "
                          f"{widths[target.hook]} features (0..{widths[target.hook] - 1})")


def upstream_hook(hook: str, hooks: list[str] | Mapping[str, int]) -> str:
    """The hook one layer below ``hook`` that has a dictionary (same site first, then any site)."""
    layer, site = hook_layer(hook), HOOK.match(hook).group(2)
    below = [h for h in hooks if hook_layer(h) == layer - 1]
    if not below:
        raise ConfigError(f"no dictionary at layer {layer - 1}, below the node at {hook}: a circuit needs a dictionary "
                          f"at each layer it descends through (hooks here: {sorted(hooks)}); lower circuits.depth")
    same = [h for h in below if h.endswith(f".{site}")]
    return (same or sorted(below))[0]


def last_hook(hooks: list[str] | Mapping[str, int], site: str = "resid") -> str:
    """The deepest hook of ``site`` with a dictionary: where a token target's feature is looked for."""
    at_site = [h for h in hooks if HOOK.match(h) and HOOK.match(h).group(2) == site]
    if not at_site:
        raise ConfigError(f"no {site} dictionary in this run to look for the token's feature in")
    return max(at_site, key=hook_layer)


def folder_name(target: Target) -> str:
    """A file-safe folder name under ``circuits/``: ``layers.5.resid_123``, ``token_29``, ``task_logit_diff``."""
    if isinstance(target, FeatureTarget):
        return f"{target.hook}_{target.index}"
    if isinstance(target, TokenTarget):
        return f"token_{target.token_id}"
    return f"task_{target.metric}"
