"""One training run from the Hydra config: validate, build, fit, evaluate on held-out text, save.

One run trains a set of dictionaries (``sae.training.plan``) from the same batches of activations: one LM forward
per batch of contexts, read at every hook of the set. Each is saved, logged and evaluated as if trained alone.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from sae.data.contexts import ContextDataModule
from sae.data.datamodule import ActivationDataModule, ReadPlan, StreamSettings
from sae.data.toy import ToyData, ToyDataModule
from sae.dictionaries import Dictionary
from sae.errors import ConfigError
from sae.evaluation.heldout import heldout_metrics_many
from sae.evaluation.toy import toy_metrics
from sae.io.atomic import write_json
from sae.io.checkpoints import (
    LAST,
    AtomicCheckpointIO,
    check_resumed_settings,
    record_settings,
    resume_checkpoint,
    write_status,
)
from sae.io.saving import save_dictionary
from sae.lm.session import LMSession, TextSettings
from sae.training.callbacks import GroundTruthMetrics, progress_bar, quiet_lightning_tips
from sae.training.module import DictionaryModule
from sae.training.objectives import Objective
from sae.training.plan import DictionaryPlan, variant_hparams
from sae.training.validation import n_processes, training_settings, validate
from sae.training.warm_start import provenance, source_directory

__all__ = ["RunInfo", "hydra_run_info", "train", "validate"]

GROUND_TRUTH = "ground_truth.safetensors"
SUMMARY = ("fvu", "l0", "ce_loss_recovered", "kl_spliced", "mmcs", "frac_recovered")  # whichever the run has

log = logging.getLogger(__name__)


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


Evaluation = Callable[[list[tuple[DictionaryPlan, Dictionary]]], list[dict]]


@dataclass
class Setup:
    """What a data source gives training: batches, extra callbacks, and the final held-out evaluation of
    trained dictionaries (one metrics dict each)."""

    datamodule: pl.LightningDataModule
    evaluate: Evaluation
    callbacks: list = field(default_factory=list)


def training_steps(train: DictConfig) -> int:
    """The run's optimiser steps: ``train.tokens / train.batch_size``, rounded down."""
    return train.tokens // train.batch_size


def lm_setup(cfg: DictConfig, plans: list[DictionaryPlan]) -> Setup:
    """Live (or cached) activations of the configured LM at every hook of the set; metrics on held-out text."""
    hooks = list(dict.fromkeys(plan.hook for plan in plans))
    stream = StreamSettings(**cfg.stream)
    session = LMSession(cfg.model.name_or_path, TextSettings.from_record(cfg.data), model_dtype=cfg.model.dtype,
                        lm_batch_size=stream.lm_batch_size, seed=cfg.seed, token_store_dir=cfg.data.token_store_dir,
                        tokenize_procs=cfg.data.tokenize_procs)
    session.prepare_text()
    if Objective.from_config(cfg.objective).on_contexts:  # the LM runs in every step: batches of token contexts
        datamodule = ContextDataModule(session, hooks, cfg.train.batch_size, cfg.seed)
    else:
        plan = ReadPlan(training_steps(cfg.train), cfg.train.init_tokens)
        datamodule = ActivationDataModule(session, hooks, stream, cfg.train.batch_size, cfg.seed, plan)

    def evaluate(trained: list[tuple[DictionaryPlan, Dictionary]]) -> list[dict]:
        """Per hook, one set of clean and ablated forwards shared by every dictionary there."""
        contexts, metrics = session.eval_contexts(cfg.data.eval_tokens), {}
        for hook in hooks:
            at_hook = {i: dictionary for i, (plan, dictionary) in enumerate(trained) if plan.hook == hook}
            metrics.update(heldout_metrics_many(session.model, at_hook, hook, contexts, session.special_ids))
        return [metrics[i] for i in range(len(trained))]

    return Setup(datamodule, evaluate)


def toy_setup(cfg: DictConfig, run: RunInfo) -> Setup:
    """Toy superposition data; the ground truth is saved as ``ground_truth.safetensors`` and MMCS is tracked."""
    d = cfg.data
    toy = ToyData(n_features=d.n_features, d=d.d, avg_active=d.avg_active, decay=d.decay, correlated=d.correlated,
                  seed=d.seed)
    if is_lead_process():
        run.dir.mkdir(parents=True, exist_ok=True)
        toy.save(run.dir / GROUND_TRUTH)

    def evaluate(trained: list[tuple[DictionaryPlan, Dictionary]]) -> list[dict]:
        return [toy_metrics(dictionary, toy, d.eval_tokens) for _, dictionary in trained]

    return Setup(ToyDataModule(toy, cfg.train.batch_size), evaluate, [GroundTruthMetrics(toy.features)])


def source_metadata(plan: DictionaryPlan, run_dir: Path) -> dict:
    """What ``sae.json`` records about where the dictionary's activations came from."""
    if plan.is_toy:
        return {
            "model": None,
            "hook": None,
            "ground_truth": os.path.relpath(run_dir / GROUND_TRUTH, plan.directory(run_dir)),
        }
    return {
        "model": OmegaConf.to_container(plan.cfg.model, resolve=True),
        "hook": {"layer": plan.hook.layer, "site": plan.hook.site},
    }


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
    logger = pl.loggers.WandbLogger(
        project=cfg.project, entity=cfg.entity, group=cfg.group or run.group, name=run.name,
        save_dir=str(run.dir), mode=mode,
    )
    # Lightning passes wandb.init anonymous=None, which W&B (>= 0.19) warns has no effect: leave the setting unset
    logger._wandb_init.pop("anonymous", None)
    return logger


def is_lead_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which write nothing of their own."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def check_launch(cfg: DictConfig, run: RunInfo) -> None:
    """Refuse several training processes inside a sweep on one machine: Lightning's DDP launcher would start the
    whole sweep again in each extra process. (On SLURM, where the cluster starts the processes, it works.)"""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    processes = n_processes(cfg.trainer)
    if run.sweep and processes != 1 and not SLURMEnvironment.detect():
        raise ConfigError(f"trainer.devices={cfg.trainer.devices} (several training processes, or as many as Lightning "
                          "finds) cannot run inside a sweep on one machine: run each job as its own command, or "
                          "launch the sweep on SLURM")


def train(cfg: DictConfig, run: RunInfo) -> dict:
    """Train the configured dictionaries; write ``sae.safetensors``, ``sae.json`` and ``metrics.json`` for each
    (at ``run.dir`` for a single dictionary, in ``run.dir/<name>/`` for each of a ``dictionaries`` set).

    Returns the held-out metrics (a dict of them by name for a set). ``status.json`` says whether the run is
    ``running``, ``finished`` (with how many seconds it took in all, in its setup, its training loop and its held-out
    evaluation) or ``failed``. With
    ``resume=true`` the run continues from ``checkpoints/last.ckpt`` in ``run.dir`` exactly where it stopped;
    without it, a directory that already holds a run is refused. Only the lead process writes outputs."""
    start = time.perf_counter()
    plans = validate(cfg)
    check_launch(cfg, run)
    lead = is_lead_process()
    checkpoint = resume_checkpoint(run.dir, cfg.resume) if lead else (run.dir / LAST if cfg.resume else None)
    if lead and checkpoint is not None:
        check_resumed_settings(run.dir, training_settings(cfg))
    setup = toy_setup(cfg, run) if cfg.data.source == "toy" else lm_setup(cfg, plans)  # text problems show here
    setup_seconds = time.perf_counter() - start
    if lead:
        if checkpoint is None:
            record_settings(run.dir, training_settings(cfg))
        write_status(run.dir, "running")
    try:
        metrics, seconds = _train(cfg, run, plans, checkpoint, setup)
    except Exception as err:
        if lead:
            write_status(run.dir, "failed", error=f"{type(err).__name__}: {err}")
        raise
    if not lead:
        return {}
    write_status(run.dir, "finished", seconds={"total": time.perf_counter() - start, "setup": setup_seconds, **seconds})
    for plan, plan_metrics in zip(plans, metrics):
        log.info("%s", result_line(plan.directory(run.dir), plan_metrics))
    if plans[0].name is None:
        return metrics[0]
    return {plan.name: m for plan, m in zip(plans, metrics)}


def result_line(directory: Path, metrics: dict) -> str:
    """What a finished dictionary is, in one line: where it is and its main held-out metrics."""
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in SUMMARY if isinstance(metrics.get(k), (int, float)))
    return f"finished: {directory} (held-out {shown}; all in metrics.json)"


def _train(cfg: DictConfig, run: RunInfo, plans: list[DictionaryPlan], checkpoint: Path | None,
           setup: Setup) -> tuple[list[dict], dict[str, float]]:
    """Fit, save and evaluate; the metrics and the seconds of the training loop and of the held-out evaluation."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")  # ours is, through the datamodule
    # Lightning's own call of a torch API that torch deprecated (nothing of ours to change; gone with its next fix)
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    t, tr = cfg.train, cfg.trainer
    steps = training_steps(t)
    module = DictionaryModule(
        dictionaries=[_member_config(plan, t.init_from) for plan in plans],
        total_steps=steps,
        lr=t.lr,
        betas=tuple(t.betas),
        warmup_steps=t.warmup_steps,
        lr_decay_frac=t.lr_decay_frac,
        sparsity_warmup_frac=t.sparsity_warmup_frac,
        dead_window=t.dead_window,
        init_tokens=t.init_tokens,
        resample_every=t.resample_every,
        resample_until=t.resample_until,
        duplicate_cos=t.duplicate_cos,
        resample_pool=t.resample_pool,
        seed=cfg.seed,
        objective=OmegaConf.to_container(cfg.objective, resolve=True),
        divergence_fvu=t.divergence_fvu,
        divergence_steps=t.divergence_steps,
    )
    logger = make_logger(cfg.logger, run)
    checkpoints = ModelCheckpoint(
        dirpath=str(run.dir / "checkpoints"), every_n_train_steps=tr.checkpoint_every_n_steps, save_last=True
    )
    quiet_lightning_tips()
    trainer = pl.Trainer(
        plugins=[AtomicCheckpointIO()], max_steps=steps, accelerator=tr.accelerator, devices=tr.devices,
        num_nodes=tr.num_nodes, strategy=tr.strategy, precision=tr.precision,
        logger=logger, log_every_n_steps=tr.log_every_n_steps, default_root_dir=str(run.dir),
        enable_model_summary=False, callbacks=[checkpoints, progress_bar(), *setup.callbacks],
    )
    trainer.fit(module, datamodule=setup.datamodule, ckpt_path=checkpoint)
    # the final state, whatever the schedule, resumable (every process takes part)
    trainer.save_checkpoint(run.dir / LAST, weights_only=False)
    if not trainer.is_global_zero:
        return [], {"train_loop": module.train_loop_seconds}
    trained = list(zip(plans, module.dictionaries()))
    start = time.perf_counter()
    metrics = setup.evaluate(trained)
    seconds = {"train_loop": module.train_loop_seconds, "heldout_eval": time.perf_counter() - start}
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
    return metrics, seconds


def _member_config(plan: DictionaryPlan, init_from: str | None) -> dict:
    """How ``DictionaryModule`` builds, starts and feeds one dictionary of the set."""
    s = plan.cfg.sae
    dictionary = {
        "variant": s.variant,
        "d_in": plan.d_in,
        "n_features": round(s.ratio * plan.d_in),
        **variant_hparams(s),
    }
    hook = None if plan.is_toy else {"layer": plan.hook.layer, "site": plan.hook.site}
    start = source_directory(plan, init_from)
    return {"name": plan.name, "input_key": plan.input_key, "hook": hook, "dictionary": dictionary,
            "init_from": None if start is None else str(start)}


def _metadata(plan: DictionaryPlan, run_dir: Path, steps: int) -> dict:
    """``sae.json``'s record of how the dictionary was trained (what it would be had it been trained alone, plus its
    name in a set)."""
    cfg = plan.cfg
    return {
        **({} if plan.name is None else {"name": plan.name}),
        **source_metadata(plan, run_dir),
        **provenance(plan, cfg.train.init_from),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        **({} if plan.is_toy else {"stream": OmegaConf.to_container(cfg.stream, resolve=True)}),
        "train": {**OmegaConf.to_container(cfg.train, resolve=True), "steps": steps,
                  "objective": OmegaConf.to_container(cfg.objective, resolve=True)},
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
        "loss": Objective.from_config(cfg.objective).doc(),
        "seed": cfg.seed,
    }
