"""Lightning callbacks of a training run."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE

from sae.evaluation.metrics import mmcs, recovered_fraction


class GroundTruthMetrics(pl.Callback):
    """Logs each dictionary's MMCS and fraction of ground-truth features recovered (cosine > 0.9) every ``every``
    steps."""

    def __init__(self, features: torch.Tensor, every: int = 500):
        self.features, self.every = features, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (trainer.global_step % self.every) == 0:
            for member in module.members:
                atoms = member.dictionary.decoder_weight().detach()
                module.log_dict({f"{member.prefix}/mmcs": mmcs(self.features.to(atoms), atoms),
                                 f"{member.prefix}/frac_recovered": recovered_fraction(self.features.to(atoms), atoms)})


class StepProgressBar(RichProgressBar):
    """Lightning's progress bar, labelled with the run's step count: a run is ``max_steps`` long on an endless stream,
    so Lightning's "Epoch 0/-2" (an epoch count of ``max_epochs=-1``) means nothing."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"training {self.trainer.max_steps:,} steps"


def progress_bar() -> pl.Callback:
    """The step-labelled rich bar, or Lightning's tqdm bar where ``rich`` is not installed."""
    return StepProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing litlogger"); its other messages stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning_tips() -> None:
    """Lightning logs its tips, unconditionally, through its rank-zero logger: filter just those lines (idempotent)."""
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in log.filters):
        log.addFilter(_NoTips())
