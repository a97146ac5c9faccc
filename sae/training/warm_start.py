"""Starting a run from dictionaries trained before (``train.init_from``), instead of a fresh initialisation.

Why: an end-to-end objective costs tens of MSE steps per step, so the affordable way to train on the model's KL
is to train with MSE for most of the tokens and fine-tune the same dictionary with ``objective=kl`` or ``kl_mse``
for the last few percent (a comparison with an MSE run at the same total tokens, at close to its compute).

``train.init_from`` is a finished run's directory; each dictionary of this run starts from the one at the same place
there (the directory itself for a run's only dictionary, ``<dir>/<name>`` in a set): its weights and its
normalisation scale. Everything else starts anew (Adam, the learning-rate schedule, the dead-feature counters).
The saved dictionary must be of the same variant, size, hook and model; its hyperparameters that hold no weights
(TopK's ``k``, the L1 coefficient) come from this run's config.
"""

from __future__ import annotations

from pathlib import Path

from sae.dictionaries import Dictionary
from sae.errors import ConfigError
from sae.evaluation.perplexity import objective_of
from sae.io.checkpoints import sha256_of
from sae.io.saving import WEIGHTS, load, read_meta
from sae.training.plan import DictionaryPlan

KEY = "initialised_from"  # the key of sae.json that records it


def source_directory(plan: DictionaryPlan, init_from: str | None) -> Path | None:
    """Where ``plan``'s starting dictionary is (None: a fresh initialisation)."""
    return None if init_from is None else plan.directory(Path(init_from))


def _same_model(saved: str | None, wanted: str) -> bool:
    """One model: the same hub id, or local directories that resolve to the same place."""
    if saved is None:
        return False
    if Path(saved).exists() and Path(wanted).exists():
        return Path(saved).resolve() == Path(wanted).resolve()
    return saved == wanted


def _mismatches(plan: DictionaryPlan, meta: dict) -> list[str]:
    """How the saved dictionary differs from what ``plan`` trains (variant, size, hook, model)."""
    found: list[str] = []
    s = plan.cfg.sae
    wanted = {"variant": s.variant, "d_in": plan.d_in, "n_features": round(s.ratio * plan.d_in)}
    for key, value in wanted.items():
        if meta.get(key) != value:
            found.append(f"{key} {meta.get(key)} (this run: {value})")
    if not plan.is_toy:
        hook = {"layer": plan.hook.layer, "site": plan.hook.site}
        if meta.get("hook") != hook:
            found.append(f"hook {meta.get('hook')} (this run: {hook})")
        saved_model = (meta.get("model") or {}).get("name_or_path")
        if not _same_model(saved_model, plan.cfg.model.name_or_path):
            found.append(f"model {saved_model} (this run: {plan.cfg.model.name_or_path})")
    return found


def init_problems(plans: list[DictionaryPlan], init_from: str | None) -> list[str]:
    """Every problem of ``train.init_from`` for the validated ``plans`` (each with its input width)."""
    if init_from is None:
        return []
    if not Path(init_from).is_dir():
        return [f"train.init_from={init_from} is not a directory: give a finished training run's directory"]
    problems = []
    for plan in plans:
        directory = source_directory(plan, init_from)
        try:
            meta = read_meta(directory)
        except ConfigError as err:
            problems.append(f"{plan.label}train.init_from: {err}")
            continue
        if not (directory / WEIGHTS).is_file():
            problems.append(f"{plan.label}train.init_from: {directory} has no {WEIGHTS} (the run did not finish)")
            continue
        found = _mismatches(plan, meta)
        if found:
            problems.append(f"{plan.label}train.init_from: the dictionary in {directory} does not match this run: "
                            + ", ".join(found))
    return problems


def load_into(dictionary: Dictionary, directory: Path) -> None:
    """Copy the saved dictionary's weights and normalisation into ``dictionary`` (same variant and shape)."""
    dictionary.load_state_dict(load(directory, device=dictionary.b_dec.device).state_dict())


def provenance(plan: DictionaryPlan, init_from: str | None) -> dict:
    """``sae.json``'s record of the starting dictionary: where it was, its weights' SHA-256, what it was trained
    with (``objective``, with its own start, e.g. ``mse``) and on how many tokens before this run
    (``tokens_before``: its own run's plus what that one started from). Empty for a fresh start."""
    directory = source_directory(plan, init_from)
    if directory is None:
        return {}
    meta = read_meta(directory)
    train = meta.get("train") or {}
    earlier = (meta.get(KEY) or {}).get("tokens_before", 0)
    return {KEY: {
        "directory": str(directory.resolve()),
        "weights_sha256": sha256_of(directory / WEIGHTS),
        "objective": objective_of(meta),
        "tokens_before": int(train.get("tokens", 0)) + int(earlier),
    }}
