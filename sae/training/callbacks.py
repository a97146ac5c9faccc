"""Lightning callbacks of a training run."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from sae.evaluation.metrics import mmcs, recovered_fraction


class GroundTruthMetrics(pl.Callback):
    """Logs each dictionary's MMCS and fraction of ground-truth features recovered (cosine > 0.9) every ``every`` steps."""

    def __init__(self, features: torch.Tensor, every: int = 500):
        self.features, self.every = features, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (trainer.global_step % self.every) == 0:
            for member in module.members:
                atoms = member.dictionary.decoder_weight().detach()
                module.log_dict({f"{member.prefix}/mmcs": mmcs(self.features.to(atoms), atoms),
                                 f"{member.prefix}/frac_recovered": recovered_fraction(self.features.to(atoms), atoms)})
