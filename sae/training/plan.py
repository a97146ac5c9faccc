"""The set of dictionaries one run trains: the config's ``dictionaries`` list, each entry merged over ``hook``/``sae``.

``dictionaries: null`` (the default) is one dictionary from the global ``hook`` and ``sae``, saved at the run
directory's root. A list trains one dictionary per entry from the same batches of activations; each entry may give

- ``name``: its subdirectory of the run and its prefix on the logger (default: from its hook, variant and sparsity);
- ``hook: {layer, site}``: merged over the global ``hook``;
- ``sae: {variant, ratio, l1_coeff | k, ...}``: merged over the global ``sae``; an entry naming another variant
  starts from that variant's own defaults, ``conf/sae/<variant>.yaml``, instead (read through the running Hydra
  application's config search path).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from sae.data.toy import TOY_HOOK
from sae.dictionaries import VARIANTS
from sae.errors import ConfigError
from sae.lm.hooks import HookPoint

ENTRY_KEYS = ("name", "hook", "sae")
RESERVED_NAMES = {"checkpoints", "csv", "wandb", "eval", ".hydra", ".", ".."}  # other things a run directory holds


def log_prefix(name: str | None, section: str) -> str:
    """``train``/``heldout`` for a run's only dictionary, ``<name>/train`` and so on in a set (a W&B panel section per
    dictionary)."""
    return section if name is None else f"{name}/{section}"


def label(name: str | None) -> str:
    """How error messages name a dictionary (empty for a run's only dictionary)."""
    return "" if name is None else f"dictionary '{name}': "


@dataclass(frozen=True)
class DictionaryPlan:
    """One dictionary of a run: its name (``None`` for a run's only dictionary), the run config with this
    dictionary's ``hook`` and ``sae``, and its input width once validated."""

    name: str | None
    cfg: DictConfig
    d_in: int = 0

    @property
    def is_toy(self) -> bool:
        return self.cfg.data.source == "toy"

    @property
    def hook(self) -> HookPoint | None:
        """Where its activations are read; ``None`` on toy data."""
        return None if self.is_toy else HookPoint(self.cfg.hook.layer, self.cfg.hook.site)

    @property
    def input_key(self) -> str:
        """The key of its input in a batch of activations."""
        return TOY_HOOK if self.is_toy else self.hook.name

    @property
    def label(self) -> str:
        return label(self.name)

    def directory(self, run_dir: Path) -> Path:
        """Where its ``sae.safetensors``, ``sae.json`` and ``metrics.json`` go."""
        return run_dir if self.name is None else run_dir / self.name

    def log_prefix(self, section: str) -> str:
        return log_prefix(self.name, section)


def variant_defaults(variant: str) -> dict | None:
    """The ``sae`` group's option ``<variant>`` (``conf/sae/<variant>.yaml``) from the running Hydra application's
    config search path, or None when it has none. Outside a Hydra application (or its ``initialize`` context) there
    is no search path: one line says so."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    if not GlobalHydra.instance().is_initialized():
        raise ConfigError(
            f"a dictionaries entry names the variant '{variant}', whose defaults come from the sae config "
            "group: run through train.py (or inside hydra.initialize), or give the entry's sae settings in full"
        )
    try:
        return OmegaConf.to_container(compose(config_name=f"sae/{variant}").sae)
    except MissingConfigException:
        return None


def variant_hparams(sae_cfg: DictConfig) -> dict:
    """The ``sae.*`` settings the chosen variant takes. A preset may set hyperparameters of several variants
    (``experiment=toy`` sets both ``l1_coeff`` and ``k``); each variant uses its own."""
    accepted = inspect.signature(VARIANTS[sae_cfg.variant].__init__).parameters
    return {k: v for k, v in sae_cfg.items() if k in accepted and k not in ("d_in", "n_features")}


def default_name(hook: HookPoint | None, sae: DictConfig) -> str:
    """``<hook>.<variant>.x<ratio>`` and the sparsity setting its variant uses, e.g. ``layers.3.resid.topk.x4.k32``."""
    sparsity = ""
    if sae.variant in VARIANTS:
        hparams = variant_hparams(sae)
        sparsity = (
            f".k{hparams['k']}" if "k" in hparams else f".l1_{hparams['l1_coeff']:g}" if "l1_coeff" in hparams else ""
        )
        sparsity = f".l0_{hparams['l0_coeff']:g}" if "l0_coeff" in hparams else sparsity
    return f"{hook.name if hook else 'toy'}.{sae.variant}.x{sae.ratio:g}{sparsity}"


def _entry_config(cfg: DictConfig, entry: DictConfig) -> DictConfig:
    """The run config with the entry's hook and sae merged in, and no ``dictionaries`` list."""
    sae_base = cfg.sae
    variant = (entry.get("sae") or {}).get("variant", cfg.sae.variant)
    if variant != cfg.sae.variant and variant_defaults(variant) is not None:  # an unknown variant: validate says so
        sae_base = OmegaConf.create(variant_defaults(variant))
    merged = cfg.copy()
    with open_dict(merged):
        merged.hook = OmegaConf.merge(cfg.hook, entry.get("hook") or {})
        merged.sae = OmegaConf.merge(sae_base, entry.get("sae") or {})
        merged.dictionaries = None
    return merged


def _name_problem(name, taken: set[str]) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return f"name {name!r} must be a non-empty string"
    if "/" in name or "\\" in name or name in RESERVED_NAMES or name.startswith("."):
        return (f"name '{name}' cannot be a directory name inside the run "
                f"(no '/', no leading '.', not {sorted(RESERVED_NAMES)})")
    if name in taken:
        return f"name '{name}' is used twice; give each dictionary its own name"
    return None


def resolve(cfg: DictConfig) -> list[DictionaryPlan]:
    """The dictionaries ``cfg`` asks for (one plan per ``dictionaries`` entry, or the single global one).

    Malformed entries (not a mapping, unknown keys, bad or duplicate names) are all reported in one ConfigError;
    the merged settings themselves are checked by ``sae.training.validation.validate``."""
    entries = cfg.get("dictionaries")
    if entries is None:
        return [DictionaryPlan(None, cfg)]
    if not OmegaConf.is_list(entries) or len(entries) == 0:
        raise ConfigError("dictionaries must be a non-empty list of {name, hook: {layer, site}, sae: {...}} (or null)")
    problems, plans, taken = [], [], set()
    for i, entry in enumerate(entries):
        where = f"dictionaries[{i}]"
        if not OmegaConf.is_dict(entry):
            problems.append(f"{where} must be a mapping with keys {', '.join(ENTRY_KEYS)}")
            continue
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            problems.append(f"{where} has unknown keys {unknown}; an entry takes {', '.join(ENTRY_KEYS)}")
            continue
        if cfg.data.source == "toy" and entry.get("hook") is not None:
            problems.append(f"{where} gives a hook, but toy data (data=toy) has no hook points; leave it out")
            continue
        entry_cfg = _entry_config(cfg, entry)
        plan = DictionaryPlan(None, entry_cfg)
        name = entry.get("name") or default_name(plan.hook, entry_cfg.sae)
        problem = _name_problem(name, taken)
        if problem:
            problems.append(f"{where}: {problem}")
        taken.add(str(name))
        plans.append(DictionaryPlan(str(name), entry_cfg))
    if problems:
        raise ConfigError("; ".join(problems))
    return plans
