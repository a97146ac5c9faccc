"""Checking a training config before any heavy work: every problem found is reported in one line.

What can be checked without the model (``config_problems``) is checked first; then the LM's config (no weights)
gives each dictionary's input width and the hooks that exist (``validate``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from omegaconf import DictConfig, OmegaConf

from sae.data.cache import CACHE_DTYPES
from sae.data.toy import ToyData
from sae.dictionaries import VARIANTS
from sae.errors import ConfigError
from sae.lm.hooks import check_hook, site_width
from sae.lm.model import check_context_length, load_config
from sae.training.objectives import Objective
from sae.training.plan import DictionaryPlan, resolve
from sae.training.spliced import downstream_hooks, n_layers
from sae.training.warm_start import init_problems

# what a resumed run may change: where and how often it reports, and the held-out evaluation after training;
# every other setting (any key added later included) changes the trained result and must stay as the run began
RESUMABLE = ("resume", "logger", "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "data.eval_tokens")
SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")  # strategies whose workers cannot hand results back to train()


def _check(cond: bool, problem: str, problems: list[str]) -> None:
    if not cond:
        problems.append(problem)


def _train_problems(t: DictConfig) -> list[str]:
    """Problems of the optimisation settings (``train``)."""
    problems: list[str] = []
    _check(
        t.tokens >= t.batch_size > 0,
        f"train.tokens ({t.tokens}) must be >= train.batch_size ({t.batch_size}) > 0",
        problems,
    )
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0", problems)
    _check(
        t.divergence_fvu > 1,
        f"train.divergence_fvu={t.divergence_fvu} must be > 1 (an FVU of 1 is the mean's)",
        problems,
    )
    for key in ("init_tokens", "dead_window", "divergence_steps"):
        _check(t[key] >= 1, f"train.{key}={t[key]} must be >= 1", problems)
    for key in ("warmup_steps", "resample_every", "resample_pool"):
        _check(t[key] >= 0, f"train.{key}={t[key]} must be >= 0", problems)
    for key in ("lr_decay_frac", "sparsity_warmup_frac", "resample_until"):
        _check(0 <= t[key] <= 1, f"train.{key}={t[key]} must be in [0, 1]", problems)
    return problems


def _trainer_problems(tr: DictConfig, batch_size: int) -> list[str]:
    """Problems of the Trainer's hardware and cadence settings (``trainer``)."""
    problems: list[str] = []
    for key in ("checkpoint_every_n_steps", "log_every_n_steps"):
        _check(tr[key] >= 1, f"trainer.{key}={tr[key]} must be >= 1", problems)
    processes = n_processes(tr)
    if processes and processes > 1:
        _check(batch_size % processes == 0, f"train.batch_size ({batch_size}) must be divisible by the {processes} "
               "processes (trainer.devices x trainer.num_nodes): each trains on its share of every batch", problems)
    _check(not str(tr.strategy).startswith(SPAWNING), f"trainer.strategy={tr.strategy} is not supported: use "
           "trainer.strategy=ddp (processes started as scripts) for several devices", problems)
    if str(tr.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(f"trainer.accelerator={tr.accelerator} but this machine has no CUDA device: use "
                        "trainer.accelerator=cpu (or auto)")
    return problems


def _data_problems(cfg: DictConfig) -> list[str]:
    """Problems of the text (``data``) and of the stream of activations made from it (``stream``)."""
    d, problems = cfg.data, []
    _check(d.eval_tokens >= 1, f"data.eval_tokens={d.eval_tokens} must be >= 1", problems)
    if d.source == "toy":
        return problems + ToyData.problems(d.n_features, d.d, d.avg_active, d.decay)
    st = cfg.stream
    _check(0 < d.heldout_fraction < 1, f"data.heldout_fraction={d.heldout_fraction} must be in (0, 1)", problems)
    _check(d.context_length >= 2, f"data.context_length={d.context_length} must be >= 2", problems)
    _check(st.lm_batch_size >= 1, f"stream.lm_batch_size={st.lm_batch_size} must be >= 1", problems)
    _check(st.buffer_size >= 2 * cfg.train.batch_size,
           f"stream.buffer_size ({st.buffer_size}) must be >= 2 * train.batch_size", problems)
    if OmegaConf.is_missing(d, "path"):
        problems.append(
            "data.path is not set: give a text file or glob (data=text_files data.path=...) or a hub dataset"
        )
    _check(
        st.cache_dtype in CACHE_DTYPES,
        f"stream.cache_dtype='{st.cache_dtype}' must be one of {', '.join(CACHE_DTYPES)}",
        problems,
    )
    return problems


def _sae_problems(s: DictConfig) -> list[str]:
    """Problems of one dictionary's ``sae`` settings (no model needed). The ``sae`` group is open-ended (a variant
    may take any settings), so its types are checked here rather than by a schema."""
    problems: list[str] = []
    _check(s.variant in VARIANTS, f"unknown sae.variant '{s.variant}' (choose sae={'|'.join(VARIANTS)})", problems)
    numbers = {"ratio": (int, float), "l1_coeff": (int, float), "k": int, "aux_coeff": (int, float)}
    for key, kinds in numbers.items():
        if key in s and s[key] is not None and (isinstance(s[key], bool) or not isinstance(s[key], kinds)):
            problems.append(f"sae.{key}={s[key]!r} must be a {'whole ' if kinds is int else ''}number")
    if problems:
        return problems
    _check(s.ratio > 0, f"sae.ratio={s.ratio} must be > 0 (dictionary size / activation width)", problems)
    if "l1_coeff" in s:
        _check(s.l1_coeff >= 0, f"sae.l1_coeff={s.l1_coeff} must be >= 0", problems)
    if "k" in s:
        _check(s.k >= 1, f"sae.k={s.k} must be >= 1", problems)
    return problems


def _width_problems(plan: DictionaryPlan, model_config) -> tuple[int, list[str]]:
    """The dictionary's input width and the problems of its hook and size (``model_config``: the LM's; None on toy
    data)."""
    cfg, problems = plan.cfg, []
    if model_config is None:
        d_in = cfg.data.d
    else:
        try:
            check_hook(plan.hook, getattr(model_config, "num_hidden_layers", None) or model_config.n_layer)
        except ConfigError as err:
            return 0, [str(err)]
        d_in = site_width(model_config, plan.hook.site)
    size = round(cfg.sae.ratio * d_in)
    _check(size >= 1, f"sae.ratio={cfg.sae.ratio} gives {size} atoms for width {d_in}: raise sae.ratio", problems)
    if "k" in cfg.sae:
        _check(cfg.sae.k <= size, f"sae.k={cfg.sae.k} exceeds the dictionary size {size}", problems)
    return d_in, problems


def _objective_problems(cfg: DictConfig, plans: list[DictionaryPlan]) -> list[str]:
    """Problems of the objective and of what it needs: token contexts of an LM, no activation cache."""
    objective = Objective.from_config(cfg.objective)
    problems = objective.problems()
    if problems or not objective.on_contexts:
        return problems
    name = f"objective={objective.name}"
    if cfg.data.source == "toy":
        return [f"{name} runs the LM on token contexts; toy data (data=toy) has no LM: use objective=mse"]
    _check(cfg.stream.cache_dir is None, f"{name} runs the LM in every step, so the activation cache does not apply: "
           "remove stream.cache_dir (or use objective=mse)", problems)
    _check(cfg.train.resample_every == 0, f"{name} does not resample atoms yet: set train.resample_every=0 (TopK's "
           "AuxK term revives dead atoms)", problems)
    _check(cfg.train.batch_size >= cfg.data.context_length, f"{name} trains on whole contexts: train.batch_size "
           f"({cfg.train.batch_size} tokens) must be >= data.context_length ({cfg.data.context_length})", problems)
    hooks = [plan.hook for plan in plans]
    if objective.splice == "all" and len(set(hooks)) < len(hooks):
        problems.append("objective.splice=all splices every dictionary of the set at once, so each needs its own "
                        "hook: use objective.splice=each for several dictionaries at one hook")
    return problems


def _later_layer_problems(cfg: DictConfig, plans: list[DictionaryPlan], model_config) -> list[str]:
    """``e2e_ds`` needs a block output after each dictionary's hook."""
    objective = Objective.from_config(cfg.objective)
    if model_config is None or objective.downstream_coeff == 0 or not objective.on_contexts:
        return []
    layers = n_layers(model_config)
    return [f"{plan.label}objective={objective.name} compares the block outputs after the hook, but "
            f"{plan.hook.name} has none ({layers} blocks): choose an earlier hook.layer or objective=kl"
            for plan in plans if not downstream_hooks(plan.hook, layers)]


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of the config that shows without reading the model or the data."""
    plans = resolve(cfg)
    dictionaries = [plan.label + p for plan in plans for p in _sae_problems(plan.cfg.sae)]
    return (dictionaries + _train_problems(cfg.train) + _trainer_problems(cfg.trainer, cfg.train.batch_size)
            + _data_problems(cfg) + _objective_problems(cfg, plans))


def validate(cfg: DictConfig) -> list[DictionaryPlan]:
    """Check the config before any heavy work; every problem found is reported in one ConfigError.

    Returns the dictionaries to train (``sae.training.plan.resolve``), each with the width of the activations it
    will see (loading only the LM's config, no weights). A problem of an entry of ``dictionaries`` names it."""
    plans = resolve(cfg)
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    model_config = None if cfg.data.source == "toy" else load_config(cfg.model.name_or_path)
    checked = [(plan, *_width_problems(plan, model_config)) for plan in plans]
    problems = [plan.label + p for plan, _, found in checked for p in found]
    if model_config is not None:
        try:
            check_context_length(cfg.data.context_length, model_config)
        except ConfigError as err:
            problems.append(str(err))
    if not problems:
        widths = [replace(plan, d_in=d_in) for plan, d_in, _ in checked]
        problems = _later_layer_problems(cfg, plans, model_config) + init_problems(widths, cfg.train.init_from)
    if problems:
        raise ConfigError("; ".join(problems))
    return [replace(plan, d_in=d_in) for plan, d_in, _ in checked]


def training_settings(cfg: DictConfig) -> dict:
    """The run's settings as ``{dotted key: value}`` (lists whole), without those a resumed run may change
    (``RESUMABLE``)."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif not any(prefix[:-1] == k or prefix.startswith(f"{k}.") for k in RESUMABLE):
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def n_processes(tr: DictConfig) -> int | None:
    """Training processes the Trainer will start (``trainer.devices`` x ``trainer.num_nodes``); None when Lightning
    decides (``devices=auto`` or ``-1``)."""
    devices = tr.devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return devices * tr.num_nodes if devices > 0 else None
    if isinstance(devices, str):
        return None if devices == "auto" else len([d for d in devices.split(",") if d.strip()]) * tr.num_nodes
    return len(devices) * tr.num_nodes
