"""``evaluate.py analysis=<name>``: a study is the function ``conf/analysis/<name>.yaml`` names in ``_target_``,
called with the whole config and the checked dictionaries, its settings beside ``_target_`` (``cfg.analysis``).

So a study is added with one module, one settings dataclass and one YAML, and ``evaluate.py`` never changes. The
settings are typed (a dataclass registered in Hydra's ConfigStore, named first in the YAML's ``defaults:``: see
``sae.circuits.config``), so a value of the wrong type is one line before anything runs; a study reads them as that
object, ``settings_of(cfg)``, never key by key from the raw config. A study's module may define
``settings_problems(settings) -> list[str]`` (the range checks, given the same object): they are reported in the same
line as every other problem, before any model runs.

A study's module may also define ``OUTPUTS``, globs (relative to ``out``) of what it writes: before its new files are
moved in, the old files they match are removed, so an earlier run's outputs the new one no longer has (a hook, a
method) are not left beside it. A study writes into a staging directory beside ``out``; only when it has finished
are its files moved into ``out`` (each file replacing the file of the same name there, folders merged), so a failed
or killed run never leaves new files beside old ones that look like one result. Studies sharing an ``out``
(``metrics`` and ``features`` both default to ``<run>/eval``) keep each other's files; a study that reads another's
results (the features dashboard shows autointerp's explanations) finds them under ``cfg.published``, the final
``out``, while ``cfg.out`` is its staging.
"""

from __future__ import annotations

import importlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sae.errors import ConfigError
from sae.evaluation.entries import validate


def study_function(target: str) -> tuple[Callable, Callable[[DictConfig], list[str]]]:
    """The study named by ``_target_`` and its settings check (its module's ``OUTPUTS``: ``study_outputs``)."""
    module_name, _, name = str(target).rpartition(".")
    try:
        module = importlib.import_module(module_name)
        study = getattr(module, name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"analysis._target_='{target}' cannot be imported ({err}); check conf/analysis/") from None
    return study, getattr(module, "settings_problems", lambda settings: [])


def settings_of(cfg: DictConfig, group: str = "analysis") -> Any:
    """The settings object of ``cfg.<group>`` (``analysis``, ``task``): its dataclass, interpolations resolved; a
    group without a registered schema comes back as the raw node (a study not yet typed); None when unset."""
    node = cfg.get(group)
    if node is None or not isinstance(node, DictConfig):
        return node
    return OmegaConf.to_object(node) if OmegaConf.get_type(node) not in (dict, None) else node


def study_outputs(target: str) -> list[str]:
    """The globs of the files the study named by ``_target_`` writes (its module's ``OUTPUTS``; none by default)."""
    try:
        module = importlib.import_module(str(target).rpartition(".")[0])
    except ImportError:  # a study function not in an importable module (tests hand one in) owns nothing by name
        return []
    return list(getattr(module, "OUTPUTS", []))


def run_analysis(cfg: DictConfig) -> Any:
    """Check everything, then run the configured study on the dictionaries under ``cfg.run``."""
    if "_target_" not in cfg.analysis:
        raise ConfigError("analysis has no _target_: choose a study, analysis=metrics|features|...")
    study, problems = study_function(cfg.analysis._target_)
    entries = validate(cfg, problems(settings_of(cfg)))
    final = Path(cfg.out)
    staging = final.parent / f".{final.name}.staging-{uuid.uuid4().hex[:8]}"
    staged = cfg.copy()
    with open_dict(staged):
        staged.out, staged.published = str(staging), str(final)  # published: earlier studies' results, to read
    try:
        result = study(staged, entries)
        for pattern in study_outputs(cfg.analysis._target_):
            for old in final.glob(pattern):
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"results in {final}")
    return result


def publish(staging: Path, final: Path) -> None:
    """Move everything the study wrote under ``staging`` into ``final``: a file replaces the file of the same name,
    a folder is merged into the folder of the same name (``plots/`` holds several studies' figures)."""
    final.mkdir(parents=True, exist_ok=True)
    if not staging.is_dir():
        return
    for item in sorted(staging.iterdir()):
        target = final / item.name
        if item.is_dir() and target.is_dir() and not target.is_symlink():
            publish(item, target)
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(item, target)
