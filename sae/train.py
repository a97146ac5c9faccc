"""Compose a training run from the Hydra config: validate, build, fit, evaluate on held-out text, save."""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from sae.checkpoints import LAST, AtomicCheckpointIO, resume_checkpoint, write_status
from sae.datamodule import ActivationDataModule
from sae.dictionaries import VARIANTS, Dictionary
from sae.errors import ConfigError
from sae.hooks import HookPoint, check_hook, site_width
from sae.metrics import heldout_metrics
from sae.model import load_config
from sae.module import DictionaryModule
from sae.saving import save_dictionary, write_json
from sae.toy import TOY_HOOK, GroundTruthMetrics, ToyData, ToyDataModule, toy_metrics

LOSS_DOC = (
    "activations are divided by normalisation.scale; mse = batch mean of ||x - x_hat||^2 summed over dimensions "
    "(normalised units); l1 = batch mean of sum_i |c_i| (codes of unit-norm atoms); loss = mse + l1_coeff * l1 "
    "(topk: loss = mse)"
)


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


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of the config that shows without reading any file."""
    problems: list[str] = []
    s, t, d = cfg.sae, cfg.train, cfg.data
    _check(s.variant in VARIANTS, f"unknown sae.variant '{s.variant}' (choose sae={'|'.join(VARIANTS)})", problems)
    _check(s.ratio > 0, f"sae.ratio={s.ratio} must be > 0 (dictionary size / activation width)", problems)
    if "l1_coeff" in s:
        _check(s.l1_coeff >= 0, f"sae.l1_coeff={s.l1_coeff} must be >= 0", problems)
    if "k" in s:
        _check(s.k >= 1, f"sae.k={s.k} must be >= 1", problems)
    _check(t.tokens >= t.batch_size > 0, f"train.tokens ({t.tokens}) must be >= train.batch_size ({t.batch_size}) > 0", problems)
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0", problems)
    for key in ("init_tokens", "dead_window", "checkpoint_every_n_steps", "log_every_n_steps"):
        _check(t[key] >= 1, f"train.{key}={t[key]} must be >= 1", problems)
    _check(t.warmup_steps >= 0 and t.resample_every >= 0, "train.warmup_steps and train.resample_every must be >= 0", problems)
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
    return problems


def validate(cfg: DictConfig) -> int:
    """Check the config before any heavy work; every problem found is reported in one ConfigError.

    Returns the width of the activations the dictionary will see (loading only the LM's config, no weights).
    """
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    s = cfg.sae
    d_in = cfg.data.d if cfg.data.source == "toy" else _lm_width(cfg)
    if "k" in s:
        _check(s.k <= round(s.ratio * d_in), f"sae.k={s.k} exceeds the dictionary size {round(s.ratio * d_in)}", problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return d_in


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


def variant_hparams(sae_cfg: DictConfig) -> dict:
    """The ``sae.*`` settings the chosen variant takes. A preset may set hyperparameters of several variants
    (``experiment=toy`` sets both ``l1_coeff`` and ``k``); each variant uses its own."""
    accepted = inspect.signature(VARIANTS[sae_cfg.variant].__init__).parameters
    return {k: v for k, v in sae_cfg.items() if k in accepted and k not in ("d_in", "n_features")}


def _lm_width(cfg: DictConfig) -> int:
    model_config = load_config(cfg.model.name_or_path)
    layers = getattr(model_config, "num_hidden_layers", None) or model_config.n_layer
    check_hook(HookPoint(cfg.hook.layer, cfg.hook.site), layers)
    return site_width(model_config, cfg.hook.site)


@dataclass
class Setup:
    """What a data source gives training: batches, the key of the dictionary's input in a batch, extra callbacks,
    the final held-out evaluation, and what to record about the source in ``sae.json``."""

    datamodule: pl.LightningDataModule
    input_key: str
    evaluate: Callable[[Dictionary], dict]
    metadata: dict
    callbacks: list = field(default_factory=list)


def lm_setup(cfg: DictConfig) -> Setup:
    """Live activations of the configured LM at the configured hook; metrics on held-out text."""
    hook = HookPoint(cfg.hook.layer, cfg.hook.site)
    d, t = cfg.data, cfg.train
    datamodule = ActivationDataModule(
        cfg.model.name_or_path, [hook], d.source, d.path, d.text_column, d.split, d.context_length,
        d.heldout_fraction, d.lm_batch_size, d.buffer_size, t.batch_size, cfg.model.dtype, cfg.seed,
    )
    datamodule.prepare_text()
    n_eval = max(1, math.ceil(d.eval_tokens / d.context_length))

    def evaluate(dictionary: Dictionary) -> dict:
        contexts = datamodule.heldout_contexts[:n_eval]
        return heldout_metrics(datamodule.model, dictionary, hook, contexts, datamodule.special_ids)

    metadata = {"model": OmegaConf.to_container(cfg.model, resolve=True), "hook": {"layer": hook.layer, "site": hook.site}}
    return Setup(datamodule, hook.name, evaluate, metadata)


def toy_setup(cfg: DictConfig, run: RunInfo) -> Setup:
    """Toy superposition data; the ground truth is saved as ``ground_truth.safetensors`` and MMCS is tracked."""
    d = cfg.data
    toy = ToyData(d.n_features, d.d, d.avg_active, d.decay, d.correlated, d.seed)
    if is_lead_process():
        run.dir.mkdir(parents=True, exist_ok=True)
        toy.save(run.dir / "ground_truth.safetensors")
    return Setup(
        ToyDataModule(toy, cfg.train.batch_size), TOY_HOOK, lambda dictionary: toy_metrics(dictionary, toy, d.eval_tokens),
        {"model": None, "hook": None, "ground_truth": "ground_truth.safetensors"}, [GroundTruthMetrics(toy.features)],
    )


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
    """Train one dictionary as configured; write ``sae.safetensors``, ``sae.json`` and ``metrics.json`` to ``run.dir``.

    ``status.json`` says whether the run is ``running``, ``finished`` or ``failed`` (with the error). With
    ``resume=true`` the run continues from ``checkpoints/last.ckpt`` in ``run.dir`` exactly where it stopped;
    without it, a directory that already holds a run is refused. Only the lead process writes outputs."""
    d_in = validate(cfg)
    check_launch(cfg, run)
    lead = is_lead_process()
    checkpoint = resume_checkpoint(run.dir, cfg.resume) if lead else (run.dir / LAST if cfg.resume else None)
    if lead:
        write_status(run.dir, "running")
    try:
        metrics = _train(cfg, run, d_in, checkpoint)
    except Exception as err:
        if lead:
            write_status(run.dir, "failed", error=f"{type(err).__name__}: {err}")
        raise
    if lead:
        write_status(run.dir, "finished")
    return metrics


def _train(cfg: DictConfig, run: RunInfo, d_in: int, checkpoint: Path | None) -> dict:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")  # ours is, through the datamodule
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    setup = toy_setup(cfg, run) if cfg.data.source == "toy" else lm_setup(cfg)
    t = cfg.train
    dictionary_cfg = {"variant": cfg.sae.variant, "d_in": d_in, "n_features": round(cfg.sae.ratio * d_in), **variant_hparams(cfg.sae)}
    steps = t.tokens // t.batch_size
    module = DictionaryModule(
        dictionary_cfg, setup.input_key, steps, t.lr, tuple(t.betas), t.warmup_steps, t.lr_decay_frac,
        t.sparsity_warmup_frac, t.dead_window, t.init_tokens, t.resample_every, t.resample_until, t.duplicate_cos,
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
        return {}
    metrics = setup.evaluate(module.dictionary)
    metadata = {
        **setup.metadata,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "train": {**OmegaConf.to_container(cfg.train, resolve=True), "steps": steps},
        "loss": LOSS_DOC,
        "seed": cfg.seed,
    }
    save_dictionary(module.dictionary, run.dir, metadata)
    write_json(run.dir / "metrics.json", metrics)
    if logger is not None:
        logger.log_metrics({f"heldout/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.global_step)
        logger.finalize("success")
        if cfg.logger.kind == "wandb":
            import wandb

            wandb.finish()
    return metrics
