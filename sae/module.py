"""LightningModule: a set of dictionaries trained with Adam, each on one hook's activations of the same batches.

Each dictionary of the set trains exactly as it would alone: its own seeded initialisation, dead-feature counters
and resampling generator, and a loss that touches only its own parameters. The set's loss is the sum of theirs,
and Adam's update is elementwise, so one optimizer over all parameters takes each dictionary's own step.

With several processes (DDP) firing is counted over all of them, the normalisation is rank 0's, and resampling
draws from the gathered batch with a generator in the same state everywhere, so every process makes the same
change. The generators' states are saved in checkpoints, so a resumed run resamples alike.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from torch import nn

from sae.dictionaries import Dictionary, build
from sae.dictionary_set import label, log_prefix
from sae.distributed import broadcast_tensors_, gather_rows, sum_across_ranks, world_size
from sae.errors import TrainingDiverged
from sae.metrics import fvu


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


def seeded_build(dictionary_cfg: dict, seed: int) -> Dictionary:
    """Build a dictionary from ``seed`` alone, whatever the global random state (so a set's members do not depend
    on one another)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(**dictionary_cfg)


class TrainedDictionary(nn.Module):
    """One dictionary of a run with its training state: which batch key feeds it, how long each feature has gone
    without firing, and its own generator for resampling.

    ``name`` is ``None`` for a run's only dictionary (logged under ``train/``), else its name in the set (logged
    under ``<name>/train/``).
    """

    def __init__(self, name: str | None, input_key: str, dictionary_cfg: dict, seed: int = 0, dead_window: int = 500_000):
        super().__init__()
        self.name, self.input_key, self.dead_window = name, input_key, dead_window
        self.dictionary = seeded_build(dictionary_cfg, seed)
        n = self.dictionary.n_features
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("fired_since_histogram", torch.zeros(n, dtype=torch.long))
        self.generator = torch.Generator().manual_seed(seed)  # CPU: resampling draws on the CPU whatever the device

    @property
    def prefix(self) -> str:
        return log_prefix(self.name, "train")

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_window

    def normalised_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch[self.input_key] / self.dictionary.scale

    def training_loss(self, batch: dict[str, torch.Tensor], sparsity_weight: float) -> tuple[torch.Tensor, dict]:
        """This dictionary's loss on ``batch`` and its metrics (logged under ``prefix``); counts firing."""
        x = self.normalised_input(batch)
        out = self.dictionary.loss(x, dead=self.dead_mask())
        loss = out["mse"] + sparsity_weight * out["sparsity"] + out["aux"]
        active = out["codes"].detach() != 0
        self.track_firing(active)
        metrics = {
            "loss": loss.detach(),
            "mse": out["mse"].detach(),
            "sparsity": out["sparsity"].detach(),
            "aux": out["aux"].detach(),
            "fvu": fvu(x, out["x_hat"].detach()),
            "l0": active.sum(-1, dtype=torch.float32).mean(),
            "dead_frac": self.dead_mask().float().mean(),
        }
        return loss, {f"{self.prefix}/{k}": v for k, v in metrics.items()}

    def track_firing(self, active: torch.Tensor) -> None:
        """Count firing from the ``[batch, n_features]`` mask of non-zero codes."""
        fired = sum_across_ranks(active.sum(0))
        self.tokens_since_fired += len(active) * world_size()  # every process's batch has the same size
        self.tokens_since_fired[fired > 0] = 0
        self.fired_since_histogram += fired

    def take_density(self, tokens: int) -> torch.Tensor:
        """Each feature's firing density since the last call (over ``tokens`` activations); restarts the count."""
        density = self.fired_since_histogram.float().cpu() / tokens
        self.fired_since_histogram.zero_()
        return density

    @torch.no_grad()
    def resample(self, x: torch.Tensor, optimizer: torch.optim.Optimizer, duplicate_cos: float) -> int:
        """Re-seed dead and duplicate atoms with inputs ``x`` (normalised) drawn with probability proportional to
        their squared loss (Anthropic, "Towards Monosemanticity"); their Adam state is reset. Returns how many.
        ``x`` is gathered from every process."""
        x = gather_rows(x)
        d = self.dictionary
        stale = self.dead_mask() | duplicate_atoms(d.decoder_weight(), duplicate_cos)
        dead = stale.nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        residual = x - d.decode_normalised(d.encode_normalised(x))
        weights = residual.pow(2).sum(-1).pow(2).float().cpu()
        picks = torch.multinomial(weights + 1e-12, len(dead), replacement=len(dead) > len(x), generator=self.generator)
        d.reinit_atoms_(dead, residual[picks.to(x.device)])
        for param in d.atom_parameters():
            for buf in optimizer.state.get(param, {}).values():
                if torch.is_tensor(buf) and buf.dim() > 0 and buf.shape[0] == d.n_features:
                    buf[dead] = 0
        self.tokens_since_fired[dead] = 0
        return len(dead)


class DictionaryModule(pl.LightningModule):
    """Trains a set of dictionaries on batches ``{input_key: [batch, d_in]}``.

    ``dictionaries``: one ``{"name", "input_key", "dictionary": {variant, d_in, n_features, ...}}`` per member (a
    single member named ``None`` for an ordinary run). Every member is built from ``seed``. A feature is dead when
    it has not fired for ``dead_window`` activations. Every ``resample_every`` steps (0: never) until
    ``resample_until`` of the run, each member's dead atoms are resampled, and so is one of each pair of atoms whose
    directions have cosine similarity above ``duplicate_cos`` (a duplicate atom fires, so it is never dead, but it
    is capacity lost to the features no atom has found).
    """

    def __init__(
        self,
        dictionaries: list[dict],
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
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.members = nn.ModuleList(
            TrainedDictionary(m["name"], m["input_key"], m["dictionary"], seed, dead_window) for m in dictionaries
        )
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._last_time = None
        self._loop_start = None
        self.train_loop_seconds = 0.0

    def dictionaries(self) -> list[Dictionary]:
        """The members' dictionaries, in the order they were given."""
        return [member.dictionary for member in self.members]

    def on_fit_start(self) -> None:
        if not self.initialised:
            sample = self.trainer.datamodule.sample(self.hparams.init_tokens)
            for member in self.members:
                member.dictionary.init_from_data(sample[member.input_key].to(self.device))
                broadcast_tensors_([*member.dictionary.parameters(), *member.dictionary.buffers()])
            self.initialised.fill_(True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["resample_generators"] = [member.generator.get_state() for member in self.members]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for member, state in zip(self.members, checkpoint.get("resample_generators", [])):
            member.generator.set_state(state)

    def on_train_start(self) -> None:
        self._loop_start = time.perf_counter()

    def on_train_end(self) -> None:
        self.train_loop_seconds = time.perf_counter() - self._loop_start

    def sparsity_weight(self) -> float:
        ramp = self.hparams.sparsity_warmup_frac * self.hparams.total_steps
        return min(1.0, (self.global_step + 1) / ramp) if ramp > 0 else 1.0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        weight = self.sparsity_weight()
        losses, metrics = [], {}
        for member in self.members:
            loss, member_metrics = member.training_loss(batch, weight)
            losses.append(loss)
            metrics.update(member_metrics)
        total = torch.stack(losses).sum()
        if not torch.isfinite(total):
            self._diverged(losses)
        metrics["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log_dict(metrics, on_step=True, on_epoch=False)
        if len(self.members) == 1:
            self.log("l0", metrics["train/l0"], prog_bar=True, logger=False)
            self.log("fvu", metrics["train/fvu"], prog_bar=True, logger=False)
        self._log_speed(len(next(iter(batch.values()))))
        if (self.global_step + 1) % self.hparams.histogram_every == 0:
            self._log_density_histograms()
        return total

    def _diverged(self, losses: list[torch.Tensor]) -> None:
        member, loss = next((m, loss) for m, loss in zip(self.members, losses) if not torch.isfinite(loss))
        raise TrainingDiverged(
            f"{label(member.name)}the loss became {loss.item()} at step {self.global_step}: the learning rate "
            f"(train.lr={self.hparams.lr}) is probably too high, or activations overflow (model.dtype); "
            "the last good checkpoint is checkpoints/last.ckpt in the run directory"
        )

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Between optimizer steps, like after the previous batch, but after that step's checkpoint was written:
        # a run resumed from it resamples here just as the uninterrupted one does.
        hp = self.hparams
        step = self.global_step  # optimizer steps done so far
        if hp.resample_every and 0 < step and step % hp.resample_every == 0 and step <= hp.resample_until * hp.total_steps:
            optimizer = self.trainer.optimizers[0]
            for member in self.members:
                count = member.resample(member.normalised_input(batch), optimizer, hp.duplicate_cos)
                self.log(f"{member.prefix}/resampled", float(count), on_step=True, on_epoch=False)

    def _log_density_histograms(self) -> None:
        tokens = self.hparams.histogram_every * self.trainer.datamodule.batch_size
        densities = {member.prefix: member.take_density(tokens) for member in self.members}
        logger = self.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            import wandb

            logger.experiment.log({
                **{f"{prefix}/log10_feature_density": wandb.Histogram(torch.log10(d.clamp_min(1e-7)).numpy())
                   for prefix, d in densities.items()},
                "trainer/global_step": self.global_step,
            })

    def _log_speed(self, n: int) -> None:
        now = time.perf_counter()
        if self._last_time is not None:
            self.log("acts_per_s", n / max(now - self._last_time, 1e-9), prog_bar=True, on_step=True, on_epoch=False)
        self._last_time = now

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.Adam(self.members.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, hp.total_steps, hp.warmup_steps, hp.lr_decay_frac)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
