"""``evaluate.py analysis=<name>``: a study is the function ``conf/analysis/<name>.yaml`` names in ``_target_``,
called with the whole config and the checked dictionaries, its settings beside ``_target_`` (``cfg.analysis``).

So a study is added with one module and one YAML, and ``evaluate.py`` never changes. A study's module may define
``settings_problems(settings) -> list[str]``: they are reported in the same line as every other problem, before any
model runs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from omegaconf import DictConfig

from sae.errors import ConfigError
from sae.evaluation.entries import validate


def study_function(target: str) -> tuple[Callable, Callable[[DictConfig], list[str]]]:
    """The study named by ``_target_`` and its settings check."""
    module_name, _, name = str(target).rpartition(".")
    try:
        module = importlib.import_module(module_name)
        study = getattr(module, name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"analysis._target_='{target}' cannot be imported ({err}); check conf/analysis/") from None
    return study, getattr(module, "settings_problems", lambda settings: [])


def run_analysis(cfg: DictConfig) -> Any:
    """Check everything, then run the configured study on the dictionaries under ``cfg.run``."""
    if "_target_" not in cfg.analysis:
        raise ConfigError("analysis has no _target_: choose a study, analysis=metrics|features|...")
    study, problems = study_function(cfg.analysis._target_)
    entries = validate(cfg, problems(cfg.analysis))
    return study(cfg, entries)
