"""Compose a training run from the Hydra config: validate, build, fit, evaluate on held-out text, save.

One run trains a set of dictionaries (``sae.dictionary_set``) from the same batches of activations: one LM forward
per batch of contexts, read at every hook of the set. Each is saved, logged and evaluated as if trained alone.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from sae.cache import CACHE_DTYPES
from sae.checkpoints import LAST, AtomicCheckpointIO, resume_checkpoint, write_status
from sae.datamodule import ActivationDataModule
from sae.dictionaries import VARIANTS, Dictionary
from sae.dictionary_set import DictionaryPlan, resolve, variant_hparams
from sae.errors import ConfigError
from sae.hooks import check_hook, site_width
from sae.metrics import heldout_metrics_many
from sae.model import load_config
from sae.module import DictionaryModule
from sae.saving import save_dictionary, write_json
from sae.toy import GroundTruthMetrics, ToyData, ToyDataModule, toy_metrics

__all__ = ["RunInfo", "hydra_run_info", "train", "validate", "variant_hparams"]

LOSS_DOC = (
    "activations are divided by normalisation.scale; mse = batch mean of ||x - x_hat||^2 summed over dimensions "
    "(normalised units); l1 = batch mean of sum_i |c_i| (codes of unit-norm atoms); loss = mse + l1_coeff * l1 "
    "(topk: loss = mse)"
)
GROUND_TRUTH = "ground_truth.safetensors"


@dataclass(frozen=True)
class RunInfo:
    """Where a run writes and how it is named and grouped on the logger."""

    dir: Path
    name: str
    group: str | None
    sweep: bool = False  # one job of several launched by one command (a Hydra multirun, the toy sweep)


def hydra_run_info() -> RunInfo:
    """Run directory, name and W&B group from Hydra (multirun jobs share the sweep directory as their group)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    name = hc.job.override_dirname or out.name
    if hc.mode == RunMode.MULTIRUN:
        return RunInfo(out, name, str(Path(hc.sweep.dir)).replace(os.sep, "_"), sweep=True)
    return RunInfo(out, name, None)


def _check(cond: bool, problem: str, problems: list[str]) -> None:
    if not cond:
        problems.append(problem)


def _run_problems(cfg: DictConfig) -> list[str]:
    """Problems of the settings every dictionary of the run shares: ``train`` and ``data``."""
    problems: list[str] = []
    t, d = cfg.train, cfg.data
    _check(t.tokens >= t.batch_size > 0, f"train.tokens ({t.tokens}) must be >= train.batch_size ({t.batch_size}) > 0", problems)
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0", problems)
    for key in ("init_tokens", "dead_window", "checkpoint_every_n_steps", "log_every_n_steps"):
        _check(t[key] >= 1, f"train.{key}={t[key]} must be >= 1", problems)
    for key in ("warmup_steps", "resample_every", "resample_pool"):
        _check(t[key] >= 0, f"train.{key}={t[key]} must be >= 0", problems)
    for key in ("lr_decay_frac", "sparsity_warmup_frac", "resample_until"):
        _check(0 <= t[key] <= 1, f"train.{key}={t[key]} must be in [0, 1]", problems)
    _check(d.eval_tokens >= 1, f"data.eval_tokens={d.eval_tokens} must be >= 1", problems)
    processes = n_processes(t)
    if processes and processes > 1:
        _check(t.batch_size % processes == 0, f"train.batch_size ({t.batch_size}) must be divisible by the {processes} "
               "processes (train.devices x train.num_nodes): each trains on its share of every batch", problems)
    _check(not str(t.strategy).startswith(SPAWNING), f"train.strategy={t.strategy} is not supported: use "
           "train.strategy=ddp (processes started as scripts) for several devices", problems)
    if d.source == "toy":
        problems += ToyData.problems(d.n_features, d.d, d.avg_active, d.decay)
    else:
        _check(0 < d.heldout_fraction < 1, f"data.heldout_fraction={d.heldout_fraction} must be in (0, 1)", problems)
        _check(d.context_length >= 2, f"data.context_length={d.context_length} must be >= 2", problems)
        _check(d.buffer_size >= 2 * t.batch_size, f"data.buffer_size ({d.buffer_size}) must be >= 2 * train.batch_size", problems)
        if OmegaConf.is_missing(d, "path"):
            problems.append("data.path is not set: give a file or glob, e.g. data.path=../shared/fixtures/text/openwebtext-1k.jsonl")
        cache_dtype = d.get("cache_dtype", "float16")
        _check(cache_dtype in CACHE_DTYPES, f"data.cache_dtype='{cache_dtype}' must be one of {', '.join(CACHE_DTYPES)}", problems)
    return problems


def _sae_problems(s: DictConfig) -> list[str]:
    """Problems of one dictionary's ``sae`` settings (no model needed)."""
    problems: list[str] = []
    _check(s.variant in VARIANTS, f"unknown sae.variant '{s.variant}' (choose sae={'|'.join(VARIANTS)})", problems)
    _check(s.ratio > 0, f"sae.ratio={s.ratio} must be > 0 (dictionary size / activation width)", problems)
    if "l1_coeff" in s:
        _check(s.l1_coeff >= 0, f"sae.l1_coeff={s.l1_coeff} must be >= 0", problems)
    if "k" in s:
        _check(s.k >= 1, f"sae.k={s.k} must be >= 1", problems)
    return problems


def _width_problems(plan: DictionaryPlan, model_config) -> tuple[int, list[str]]:
    """The dictionary's input width and the problems of its hook and size (``model_config``: the LM's; None on toy data)."""
    cfg, problems = plan.cfg, []
    if model_config is None:
        d_in = cfg.data.d
    else:
        try:
            check_hook(plan.hook, getattr(model_config, "num_hidden_layers", None) or model_config.n_layer)
        except ConfigError as err:
            return 0, [str(err)]
        d_in = site_width(model_config, plan.hook.site)
    if "k" in cfg.sae:
        size = round(cfg.sae.ratio * d_in)
        _check(cfg.sae.k <= size, f"sae.k={cfg.sae.k} exceeds the dictionary size {size}", problems)
    return d_in, problems


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of the config that shows without reading the model or the data."""
    return [plan.label + p for plan in resolve(cfg) for p in _sae_problems(plan.cfg.sae)] + _run_problems(cfg)


def validate(cfg: DictConfig) -> list[DictionaryPlan]:
    """Check the config before any heavy work; every problem found is reported in one ConfigError.

    Returns the dictionaries to train (``sae.dictionary_set.resolve``), each with the width of the activations it
    will see (loading only the LM's config, no weights). A problem of an entry of ``dictionaries`` names it."""
    plans = resolve(cfg)
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    model_config = None if cfg.data.source == "toy" else load_config(cfg.model.name_or_path)
    checked = [(plan, *_width_problems(plan, model_config)) for plan in plans]
    problems = [plan.label + p for plan, _, found in checked for p in found]
    if problems:
        raise ConfigError("; ".join(problems))
    return [replace(plan, d_in=d_in) for plan, d_in, _ in checked]


SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")  # strategies whose workers cannot hand results back to train()


def n_processes(t: DictConfig) -> int | None:
    """Training processes the Trainer will start (``train.devices`` x ``train.num_nodes``); None when Lightning
    decides (``devices=auto`` or ``-1``)."""
    devices = t.devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        return devices * t.num_nodes if devices > 0 else None
    if isinstance(devices, str):
        return None if devices == "auto" else len([d for d in devices.split(",") if d.strip()]) * t.num_nodes
    return len(devices) * t.num_nodes


Evaluation = Callable[[list[tuple[DictionaryPlan, Dictionary]]], list[dict]]


@dataclass
class Setup:
    """What a data source gives training: batches, extra callbacks, and the final held-out evaluation of
    trained dictionaries (one metrics dict each)."""

    datamodule: pl.LightningDataModule
    evaluate: Evaluation
    callbacks: list = field(default_factory=list)


def lm_setup(cfg: DictConfig, plans: list[DictionaryPlan]) -> Setup:
    """Live (or cached) activations of the configured LM at every hook of the set; metrics on held-out text."""
    hooks = list(dict.fromkeys(plan.hook for plan in plans))
    d, t = cfg.data, cfg.train
    datamodule = ActivationDataModule(
        cfg.model.name_or_path, hooks, d.source, d.path, d.text_column, d.split, d.context_length,
        d.heldout_fraction, d.lm_batch_size, d.buffer_size, t.batch_size, cfg.model.dtype, cfg.seed,
        d.get("cache_dir"), d.get("cache_dtype", "float16"),
    )
    datamodule.prepare_text()
    n_eval = max(1, math.ceil(d.eval_tokens / d.context_length))

    def evaluate(trained: list[tuple[DictionaryPlan, Dictionary]]) -> list[dict]:
        """Per hook, one set of clean and ablated forwards shared by every dictionary there."""
        contexts, metrics = datamodule.heldout_contexts[:n_eval], {}
        for hook in hooks:
            at_hook = {i: dictionary for i, (plan, dictionary) in enumerate(trained) if plan.hook == hook}
            metrics.update(heldout_metrics_many(datamodule.model, at_hook, hook, contexts, datamodule.special_ids))
        return [metrics[i] for i in range(len(trained))]

    return Setup(datamodule, evaluate)


def toy_setup(cfg: DictConfig, run: RunInfo) -> Setup:
    """Toy superposition data; the ground truth is saved as ``ground_truth.safetensors`` and MMCS is tracked."""
    d = cfg.data
    toy = ToyData(d.n_features, d.d, d.avg_active, d.decay, d.correlated, d.seed)
    if is_lead_process():
        run.dir.mkdir(parents=True, exist_ok=True)
        toy.save(run.dir / GROUND_TRUTH)

    def evaluate(trained: list[tuple[DictionaryPlan, Dictionary]]) -> list[dict]:
        return [toy_metrics(dictionary, toy, d.eval_tokens) for _, dictionary in trained]

    return Setup(ToyDataModule(toy, cfg.train.batch_size), evaluate, [GroundTruthMetrics(toy.features)])


def source_metadata(plan: DictionaryPlan, run_dir: Path) -> dict:
    """What ``sae.json`` records about where the dictionary's activations came from."""
    if plan.is_toy:
        return {"model": None, "hook": None, "ground_truth": os.path.relpath(run_dir / GROUND_TRUTH, plan.directory(run_dir))}
    return {"model": OmegaConf.to_container(plan.cfg.model, resolve=True), "hook": {"layer": plan.hook.layer, "site": plan.hook.site}}


def make_logger(cfg: DictConfig, run: RunInfo):
    """A Lightning logger: W&B (online when logged in, else offline, unless ``logger.mode`` says) or CSV."""
    if cfg.kind == "csv":
        return pl.loggers.CSVLogger(save_dir=str(run.dir), name="csv", version="")
    if cfg.kind != "wandb":
        raise ConfigError(f"unknown logger.kind '{cfg.kind}'; use logger=wandb or logger=csv")
    mode = cfg.mode
    if mode == "auto":
        netrc = Path.home() / ".netrc"
        logged_in = "WANDB_API_KEY" in os.environ or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
    return pl.loggers.WandbLogger(
        project=cfg.project, entity=cfg.entity, group=cfg.group or run.group, name=run.name,
        save_dir=str(run.dir), mode=mode,
    )


def is_lead_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which write nothing of their own."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def check_launch(cfg: DictConfig, run: RunInfo) -> None:
    """Refuse several training processes inside a sweep on one machine: Lightning's DDP launcher would start the
    whole sweep again in each extra process. (On SLURM, where the cluster starts the processes, it works.)"""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    processes = n_processes(cfg.train)
    if run.sweep and processes != 1 and not SLURMEnvironment.detect():
        raise ConfigError(f"train.devices={cfg.train.devices} (several training processes, or as many as Lightning "
                          "finds) cannot run inside a sweep on one machine: run each job as its own command, or "
                          "launch the sweep on SLURM")


def train(cfg: DictConfig, run: RunInfo) -> dict:
    """Train the configured dictionaries; write ``sae.safetensors``, ``sae.json`` and ``metrics.json`` for each
    (at ``run.dir`` for a single dictionary, in ``run.dir/<name>/`` for each of a ``dictionaries`` set).

    Returns the held-out metrics (a dict of them by name for a set). ``status.json`` says whether the run is
    ``running``, ``finished`` (with how many seconds it took in all and in its training loop) or ``failed``. With
    ``resume=true`` the run continues from ``checkpoints/last.ckpt`` in ``run.dir`` exactly where it stopped;
    without it, a directory that already holds a run is refused. Only the lead process writes outputs."""
    start = time.perf_counter()
    plans = validate(cfg)
    check_launch(cfg, run)
    lead = is_lead_process()
    checkpoint = resume_checkpoint(run.dir, cfg.resume) if lead else (run.dir / LAST if cfg.resume else None)
    if lead:
        write_status(run.dir, "running")
    try:
        metrics, loop_seconds = _train(cfg, run, plans, checkpoint)
    except Exception as err:
        if lead:
            write_status(run.dir, "failed", error=f"{type(err).__name__}: {err}")
        raise
    if not lead:
        return {}
    write_status(run.dir, "finished", seconds={"total": time.perf_counter() - start, "train_loop": loop_seconds})
    if plans[0].name is None:
        return metrics[0]
    return {plan.name: m for plan, m in zip(plans, metrics)}


def _train(cfg: DictConfig, run: RunInfo, plans: list[DictionaryPlan], checkpoint: Path | None) -> tuple[list[dict], float]:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")  # ours is, through the datamodule
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    setup = toy_setup(cfg, run) if cfg.data.source == "toy" else lm_setup(cfg, plans)
    t = cfg.train
    steps = t.tokens // t.batch_size
    module = DictionaryModule(
        [_member_config(plan) for plan in plans], steps, t.lr, tuple(t.betas), t.warmup_steps, t.lr_decay_frac,
        t.sparsity_warmup_frac, t.dead_window, t.init_tokens, t.resample_every, t.resample_until, t.duplicate_cos,
        t.resample_pool, seed=cfg.seed,
    )
    logger = make_logger(cfg.logger, run)
    checkpoints = ModelCheckpoint(dirpath=str(run.dir / "checkpoints"), every_n_train_steps=t.checkpoint_every_n_steps, save_last=True)
    trainer = pl.Trainer(
        plugins=[AtomicCheckpointIO()], max_steps=steps, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        logger=logger, log_every_n_steps=t.log_every_n_steps, default_root_dir=str(run.dir),
        enable_model_summary=False, callbacks=[checkpoints, *setup.callbacks],
    )
    trainer.fit(module, datamodule=setup.datamodule, ckpt_path=checkpoint)
    trainer.save_checkpoint(run.dir / LAST)  # the final state, whatever the schedule (every process takes part)
    if not trainer.is_global_zero:
        return [], module.train_loop_seconds
    trained = list(zip(plans, module.dictionaries()))
    metrics = setup.evaluate(trained)
    for (plan, dictionary), plan_metrics in zip(trained, metrics):
        directory = plan.directory(run.dir)
        save_dictionary(dictionary, directory, _metadata(plan, run.dir, steps))
        write_json(directory / "metrics.json", plan_metrics)
        if logger is not None:
            prefix = plan.log_prefix("heldout")
            scalars = {f"{prefix}/{k}": v for k, v in plan_metrics.items() if isinstance(v, (int, float))}
            logger.log_metrics(scalars, step=trainer.global_step)
    if logger is not None:
        logger.finalize("success")
        if cfg.logger.kind == "wandb":
            import wandb

            wandb.finish()
    return metrics, module.train_loop_seconds


def _member_config(plan: DictionaryPlan) -> dict:
    """How ``DictionaryModule`` builds and feeds one dictionary of the set."""
    s = plan.cfg.sae
    dictionary = {"variant": s.variant, "d_in": plan.d_in, "n_features": round(s.ratio * plan.d_in), **variant_hparams(s)}
    return {"name": plan.name, "input_key": plan.input_key, "dictionary": dictionary}


def _metadata(plan: DictionaryPlan, run_dir: Path, steps: int) -> dict:
    """``sae.json``'s record of how the dictionary was trained (what it would be had it been trained alone, plus its
    name in a set)."""
    cfg = plan.cfg
    return {
        **({} if plan.name is None else {"name": plan.name}),
        **source_metadata(plan, run_dir),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "train": {**OmegaConf.to_container(cfg.train, resolve=True), "steps": steps},
        "loss": LOSS_DOC,
        "seed": cfg.seed,
    }
