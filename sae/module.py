"""LightningModule: one dictionary trained on one hook's activations with Adam."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from sae.dictionaries import build
from sae.distributed import broadcast_tensors_, gather_rows, sum_across_ranks, world_size
from sae.errors import TrainingDiverged
from sae.metrics import fvu, l0


def lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over the last ``decay_frac``."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total * (1 - decay_frac)
    if decay_frac > 0 and step >= decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def duplicate_atoms(atoms: torch.Tensor, threshold: float, chunk: int = 4096) -> torch.Tensor:
    """Mask of atoms whose cosine similarity with a lower-indexed atom exceeds ``threshold`` (unit-norm rows)."""
    n = len(atoms)
    mask = torch.zeros(n, dtype=torch.bool, device=atoms.device)
    for start in range(0, n, chunk):
        cos = atoms[start : start + chunk] @ atoms.T  # [chunk, n]
        rows = torch.arange(start, min(start + chunk, n), device=atoms.device)
        cos[torch.arange(len(rows)), rows] = -1.0
        lower = torch.arange(n, device=atoms.device)[None, :] < rows[:, None]
        mask[rows] = (cos.masked_fill(~lower, -1.0) > threshold).any(dim=1)
    return mask


class DictionaryModule(pl.LightningModule):
    """Trains ``dictionary`` (built from ``dictionary_cfg``) on batches ``{hook_name: [batch, d_in]}``.

    A feature is dead when it has not fired for ``dead_window`` activations. Every ``resample_every`` steps
    (0: never) until ``resample_until`` of the run, dead atoms are resampled (``_resample``), and so is one of
    each pair of atoms whose directions have cosine similarity above ``duplicate_cos`` (a duplicate atom fires,
    so it is never dead, but it is capacity lost to the features no atom has found).

    With several processes (DDP) firing is counted over all of them, the normalisation is rank 0's, and
    resampling draws from the gathered batch with a generator in the same state everywhere, so every process
    makes the same change. The generator's state is saved in checkpoints, so a resumed run resamples alike.
    """

    def __init__(
        self,
        dictionary_cfg: dict,
        hook_name: str,
        total_steps: int,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        lr_decay_frac: float = 0.2,
        sparsity_warmup_frac: float = 0.05,
        dead_window: int = 500_000,
        init_tokens: int = 65_536,
        resample_every: int = 0,
        resample_until: float = 0.5,
        duplicate_cos: float = 0.99,
        histogram_every: int = 200,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.dictionary = build(**dictionary_cfg)
        self.hook_name = hook_name
        n = self.dictionary.n_features
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("fired_since_histogram", torch.zeros(n, dtype=torch.long))
        self._last_time = None
        self.resample_generator = torch.Generator().manual_seed(torch.initial_seed())

    def on_fit_start(self) -> None:
        if not self.initialised:
            sample = self.trainer.datamodule.sample(self.hparams.init_tokens)[self.hook_name]
            self.dictionary.init_from_data(sample.to(self.device))
            broadcast_tensors_([*self.dictionary.parameters(), *self.dictionary.buffers()])
            self.initialised.fill_(True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["resample_generator"] = self.resample_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "resample_generator" in checkpoint:
            self.resample_generator.set_state(checkpoint["resample_generator"])

    def sparsity_weight(self) -> float:
        ramp = self.hparams.sparsity_warmup_frac * self.hparams.total_steps
        return min(1.0, (self.global_step + 1) / ramp) if ramp > 0 else 1.0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[self.hook_name] / self.dictionary.scale
        out = self.dictionary.loss(x, dead=self.dead_mask())
        loss = out["mse"] + self.sparsity_weight() * out["sparsity"] + out["aux"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {self.global_step}: the learning rate "
                f"(train.lr={self.hparams.lr}) is probably too high, or activations overflow (model.dtype); "
                "the last good checkpoint is checkpoints/last.ckpt in the run directory"
            )
        codes = out["codes"].detach()
        self._track_firing(codes)
        metrics = {
            "train/loss": loss,
            "train/mse": out["mse"],
            "train/sparsity": out["sparsity"],
            "train/aux": out["aux"],
            "train/fvu": fvu(x, out["x_hat"].detach()),
            "train/l0": l0(codes),
            "train/dead_frac": self.dead_mask().float().mean(),
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
        }
        self.log_dict(metrics, on_step=True, on_epoch=False)
        self.log("l0", metrics["train/l0"], prog_bar=True, logger=False)
        self.log("fvu", metrics["train/fvu"], prog_bar=True, logger=False)
        self._log_speed(len(x))
        return loss

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.hparams.dead_window

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Between optimizer steps, like after the previous batch, but after that step's checkpoint was written:
        # a run resumed from it resamples here just as the uninterrupted one does.
        hp = self.hparams
        step = self.global_step  # optimizer steps done so far
        if hp.resample_every and 0 < step and step % hp.resample_every == 0 and step <= hp.resample_until * hp.total_steps:
            self._resample(batch[self.hook_name] / self.dictionary.scale)

    @torch.no_grad()
    def _resample(self, x: torch.Tensor) -> None:
        """Re-seed dead and duplicate atoms with inputs drawn with probability proportional to their squared
        loss (Anthropic, "Towards Monosemanticity"); their Adam state is reset. ``x`` is gathered from every process."""
        x = gather_rows(x)
        stale = self.dead_mask() | duplicate_atoms(self.dictionary.decoder_weight(), self.hparams.duplicate_cos)
        dead = stale.nonzero().squeeze(1)
        if len(dead) == 0:
            return
        residual = x - self.dictionary.decode_normalised(self.dictionary.encode_normalised(x))
        weights = residual.pow(2).sum(-1).pow(2)
        picks = torch.multinomial((weights + 1e-12).cpu(), len(dead), replacement=len(dead) > len(x),
                                  generator=self.resample_generator).to(x.device)
        self.dictionary.reinit_atoms_(dead, residual[picks])
        optimizer = self.trainer.optimizers[0]
        for param in self.dictionary.atom_parameters():
            for buf in optimizer.state.get(param, {}).values():
                if torch.is_tensor(buf) and buf.dim() > 0 and buf.shape[0] == self.dictionary.n_features:
                    buf[dead] = 0
        self.tokens_since_fired[dead] = 0
        self.log("train/resampled", float(len(dead)), on_step=True, on_epoch=False)

    def _track_firing(self, codes: torch.Tensor) -> None:
        fired = sum_across_ranks((codes != 0).sum(0))
        self.tokens_since_fired += len(codes) * world_size()  # every process's batch has the same size
        self.tokens_since_fired[fired > 0] = 0
        self.fired_since_histogram += fired
        if (self.global_step + 1) % self.hparams.histogram_every == 0:
            self._log_density_histogram()

    def _log_density_histogram(self) -> None:
        tokens = self.hparams.histogram_every * self.trainer.datamodule.batch_size
        density = self.fired_since_histogram.float().cpu() / tokens
        self.fired_since_histogram.zero_()
        logger = self.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            import wandb

            log10 = torch.log10(density.clamp_min(1e-7)).numpy()
            logger.experiment.log({"train/log10_feature_density": wandb.Histogram(log10), "trainer/global_step": self.global_step})

    def _log_speed(self, n: int) -> None:
        now = time.perf_counter()
        if self._last_time is not None:
            self.log("acts_per_s", n / max(now - self._last_time, 1e-9), prog_bar=True, on_step=True, on_epoch=False)
        self._last_time = now

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.Adam(self.dictionary.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, hp.total_steps, hp.warmup_steps, hp.lr_decay_frac)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
