"""LightningModule: a set of dictionaries trained with Adam, each on one hook's activations of the same batches.

Each dictionary of the set trains exactly as it would alone: its own seeded initialisation, dead-feature counters
and resampling generator, and a loss that touches only its own parameters. The set's loss is the sum of theirs,
and Adam's update is elementwise, so one optimizer over all parameters takes each dictionary's own step.

With several processes (DDP) firing is counted over all of them, the normalisation is rank 0's, and resampling
draws from the gathered pools of recent inputs with a generator in the same state everywhere, so every process
makes the same change: rank 0 computes the change and broadcasts it. Generators and pools are saved in
checkpoints, so a resumed run resamples alike.

A training step asks the host nothing about the device (on a GPU each such question waits for all queued work):
divergence is recorded on the device and read every ``trainer.log_every_n_steps`` steps (``sae.training.divergence``),
firing counters are updated with masks, and metrics are logged, and the progress bar fed, at logging steps only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from sae.dictionaries import Dictionary, build
from sae.dictionaries.base import firing
from sae.distributed import (
    broadcast_from_lead,
    broadcast_tensors_,
    gather_batches,
    gather_rows,
    rank,
    sum_across_ranks,
    world_size,
)
from sae.errors import TrainingDiverged
from sae.evaluation.metrics import fvu
from sae.lm.hooks import HookPoint
from sae.training.divergence import FVU_HIGH, DivergenceWatch, skip_non_finite_step
from sae.training.objectives import Objective, objective_loss, reconstruction_loss
from sae.training.plan import label, log_prefix
from sae.training.resampling import resampling_plan
from sae.training.spliced import SplicedTerms, downstream_hooks, n_layers, spliced_terms
from sae.training.warm_start import load_into


def lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over the last ``decay_frac``."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total * (1 - decay_frac)
    if decay_frac > 0 and step >= decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def seeded_build(dictionary_cfg: dict, seed: int) -> Dictionary:
    """Build a dictionary from ``seed`` alone, whatever the global random state (so a set's members do not depend
    on one another)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(**dictionary_cfg)


class TrainedDictionary(nn.Module):
    """One dictionary of a run with its training state: which batch key feeds it, how long each feature has gone
    without firing, and its own generator for resampling.

    ``resample_pool`` rows of recent inputs are kept for resampling (0: none; the module sizes the pool from
    ``train.resample_pool`` once the number of processes is known). ``name`` is ``None`` for a run's only dictionary
    (logged under ``train/``), else its name in the set (logged under ``<name>/train/``).
    """

    def __init__(self, name: str | None, input_key: str, dictionary_cfg: dict, *, seed: int, dead_window: int,
                 resample_pool: int):
        super().__init__()
        self.name, self.input_key, self.dead_window = name, input_key, dead_window
        self.dictionary = seeded_build(dictionary_cfg, seed)
        n = self.dictionary.n_features
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("fired_since_histogram", torch.zeros(n, dtype=torch.long))
        # Not buffers: each process keeps its own, which DDP would overwrite with rank 0's (see ``pool_state``).
        self.recent_inputs, self.recent_seen = torch.zeros(0, self.dictionary.d_in), 0
        self.make_pool(resample_pool)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: resampling draws on the CPU whatever the device

    @property
    def prefix(self) -> str:
        return log_prefix(self.name, "train")

    def _apply(self, fn, recurse: bool = True):
        # The pool is not a buffer (see __init__) but must follow the module's device: a pool restored from a
        # checkpoint before Lightning moves the module to the GPU would otherwise stay on the CPU.
        super()._apply(fn, recurse)
        self.recent_inputs = fn(self.recent_inputs)
        return self

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_window

    def normalised_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch[self.input_key] / self.dictionary.scale

    def training_loss(self, batch: dict[str, torch.Tensor], sparsity_weight: float) -> tuple[torch.Tensor, dict]:
        """This dictionary's loss on ``batch`` and its metrics (logged under ``prefix``); counts firing."""
        x = self.normalised_input(batch)
        self.remember(x)
        loss, out = reconstruction_loss(self.dictionary, x, self.dead_mask(), sparsity_weight)
        fired, l0 = firing(out["codes"].detach())
        self.track_firing(fired, len(x))
        metrics = {
            "loss": loss.detach(),
            "mse": out["mse"].detach(),
            "sparsity": out["sparsity"].detach(),
            "aux": out["aux"].detach(),
            "fvu": fvu(x, out["x_hat"].detach()),
            "l0": l0,
            "dead_frac": self.dead_mask().float().mean(),
        }
        return loss, {f"{self.prefix}/{k}": v for k, v in metrics.items()}

    def spliced_loss(
        self, objective: Objective, spliced: SplicedTerms, sparsity_weight: float
    ) -> tuple[torch.Tensor, dict]:
        """This dictionary's end-to-end loss from the LM's clean input and spliced run (``sae.training.spliced``),
        and its metrics (``kl``, ``downstream`` and every term of the reconstruction loss); counts firing."""
        x = spliced.x / self.dictionary.scale
        self.remember(x)
        terms = self.dictionary.train_terms(x, dead=self.dead_mask())
        loss, out = objective_loss(objective, terms, x, spliced.kl, spliced.downstream, sparsity_weight)
        fired, l0 = firing(out["codes"])
        self.track_firing(fired, len(x))
        metrics = {key: out[key].detach() for key in ("kl", "mse", "sparsity", "aux", "downstream")}
        metrics.update(loss=loss.detach(), fvu=fvu(x, out["x_hat"].detach()),
                       l0=l0, dead_frac=self.dead_mask().float().mean())
        return loss, {f"{self.prefix}/{k}": v for k, v in metrics.items()}

    def make_pool(self, rows: int) -> None:
        """Keep the last ``rows`` training inputs (normalised; this process's share), a ring that resampling
        chooses from (``rows`` = 0: none, resampling uses the current batch)."""
        self.recent_inputs, self.recent_seen = (
            torch.zeros(rows, self.dictionary.d_in, device=self.recent_inputs.device),
            0,
        )

    def pool_state(self) -> dict:
        """The pool for a checkpoint: every process's (``[processes, rows, d_in]``, on the CPU) and how many rows
        each has seen. Gathered on the backend's device (``sae.distributed``), wherever the module is now: the final
        checkpoint is written after Lightning has moved it to the CPU."""
        return {"inputs": gather_rows(self.recent_inputs[None]).cpu(), "seen": self.recent_seen}

    def load_pool_state(self, state: dict, rank: int) -> None:
        self.recent_inputs = state["inputs"][rank].to(self.dictionary.b_dec.device)
        self.recent_seen = state["seen"]

    @torch.no_grad()
    def remember(self, x: torch.Tensor) -> None:
        """Keep ``x`` among the recent inputs resampling chooses from (nothing when the pool has size 0)."""
        pool = len(self.recent_inputs)
        if pool == 0:
            return
        if self.recent_inputs.device != x.device:
            self.recent_inputs = self.recent_inputs.to(x.device)
        x = x[-pool:]
        rows = (self.recent_seen + torch.arange(len(x), device=x.device)) % pool
        self.recent_inputs[rows] = x.to(self.recent_inputs.dtype)
        self.recent_seen += len(x)

    def resampling_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What resampling chooses from: the recent inputs (the pool), or ``batch`` when there is no pool yet."""
        seen = min(self.recent_seen, len(self.recent_inputs))
        return self.recent_inputs[:seen] if seen else self.normalised_input(batch)

    def track_firing(self, fired: torch.Tensor, batch: int) -> None:
        """Count firing from how many of this process's ``batch`` inputs each feature fired on (``firing``)."""
        fired = sum_across_ranks(fired)
        self.tokens_since_fired += batch * world_size()  # every process's batch has the same size
        self.tokens_since_fired.masked_fill_(fired > 0, 0)  # a mask, not an index: no host synchronisation
        self.fired_since_histogram += fired

    def take_density(self, tokens: int) -> torch.Tensor:
        """Each feature's firing density since the last call (over ``tokens`` activations); restarts the count."""
        density = self.fired_since_histogram.float().cpu() / tokens
        self.fired_since_histogram.zero_()
        return density

    @torch.no_grad()
    def resample(self, x: torch.Tensor, optimizer: torch.optim.Optimizer, duplicate_cos: float,
                 batch_rows: int | None = None) -> int:
        """Re-seed stale (dead and duplicate) atoms from the inputs ``x`` (normalised, consecutive batches of
        ``batch_rows``; gathered from every process) that the dictionary leaves most unexplained
        (``sae.training.resampling``); their Adam state is reset. Returns how many.

        With several processes only rank 0 computes the plan (and draws from its generator) and re-seeds the atoms;
        the stale atoms' indices and the dictionary's parameters are then broadcast, so every process holds the
        same weights without relying on bitwise-equal results of the plan on different devices."""
        x = gather_batches(x, batch_rows or len(x))
        d = self.dictionary
        if rank() == 0:
            stale, directions = resampling_plan(d, x, self.dead_mask(), duplicate_cos, self.generator)
        else:
            stale = torch.zeros(0, dtype=torch.long, device=x.device)
        stale = broadcast_from_lead(stale)
        if len(stale) == 0:
            return 0
        if rank() == 0:
            d.reinit_atoms_(stale, directions)
        broadcast_tensors_(list(d.parameters()))
        for param in d.atom_parameters():
            for buf in optimizer.state.get(param, {}).values():
                if torch.is_tensor(buf) and buf.dim() > 0 and buf.shape[0] == d.n_features:
                    buf[stale] = 0
        self.tokens_since_fired[stale] = 0
        return len(stale)


class DictionaryModule(pl.LightningModule):
    """Trains a set of dictionaries on batches ``{input_key: [batch, d_in]}``.

    ``dictionaries``: one ``{"name", "input_key", "dictionary": {variant, d_in, n_features, ...}}`` per member (a
    single member named ``None`` for an ordinary run). Every member is built from ``seed``. A feature is dead when
    it has not fired for ``dead_window`` activations. Every ``resample_every`` steps (0: never) until
    ``resample_until`` of the run, each member's dead atoms are resampled, and so is one of each pair of atoms whose
    directions have cosine similarity above ``duplicate_cos`` (a duplicate atom fires, so it is never dead, but it
    is capacity lost to the features no atom has found); the new directions come from the last ``resample_pool``
    training inputs (``sae.training.resampling``).

    ``objective`` (the fields of ``sae.training.objectives.Objective``): ``mse`` trains on batches of activations;
    the end-to-end objectives on batches ``{"input_ids": [contexts, length]}`` (``sae.data.contexts``) through the
    datamodule's session's LM, which stays outside this module (no parameters here, no optimizer state, nothing
    in checkpoints). Each member's ``hook`` (``{layer, site}``, None on toy data) says where it is spliced, and
    its optional ``init_from`` (a saved dictionary's directory) what it starts from instead of a fresh start.

    A member whose loss stops being finite, or whose training FVU stays above ``divergence_fvu`` for
    ``divergence_steps`` steps in a row (``None``: not checked), stops the run with ``TrainingDiverged`` on every
    process; a step with non-finite gradients is skipped on the device (``sae.training.divergence``). After each
    optimiser step the decoder atoms are set back to unit norm (``Dictionary.normalise_atoms_``).
    """

    def __init__(
        self,
        *,
        dictionaries: list[dict],
        total_steps: int,
        lr: float,
        betas: tuple[float, float],
        warmup_steps: int,
        lr_decay_frac: float,
        sparsity_warmup_frac: float,
        dead_window: int,
        init_tokens: int,
        resample_every: int,
        resample_until: float,
        duplicate_cos: float,
        resample_pool: int,
        seed: int,
        objective: dict,
        histogram_every: int = 200,
        divergence_fvu: float | None = None,
        divergence_steps: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.members = nn.ModuleList(
            TrainedDictionary(
                m["name"], m["input_key"], m["dictionary"], seed=seed, dead_window=dead_window, resample_pool=0
            )
            for m in dictionaries
        )
        self.objective = Objective(**objective)
        self.hooks = [HookPoint(**m["hook"]) if m.get("hook") else None for m in dictionaries]
        self._later: list[list[HookPoint]] | None = None
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.divergence = DivergenceWatch(len(self.members), divergence_fvu, divergence_steps)
        self._last_time, self._last_step = None, 0
        self._loop_start = None
        self.train_loop_seconds = 0.0

    def dictionaries(self) -> list[Dictionary]:
        """The members' dictionaries, in the order they were given."""
        return [member.dictionary for member in self.members]

    def setup(self, stage: str) -> None:
        # Before a checkpoint is restored, once the number of processes is known: each keeps its share of a pool
        # of whole batches, so that the gathered pool is what one process would hold.
        hp = self.hparams
        if hp.resample_every and hp.resample_pool:
            batch = self.trainer.datamodule.batch_size
            rows = -(-hp.resample_pool // batch) * batch // self.trainer.world_size
            for member in self.members:
                member.make_pool(rows)

    def on_fit_start(self) -> None:
        # A member with ``init_from`` (a saved dictionary's directory, sae.training.warm_start) starts from it; the
        # others from a sample of activations. A resumed run has ``initialised`` set and keeps its checkpoint's.
        if not self.initialised:
            starts = [m.get("init_from") for m in self.hparams.dictionaries]
            if not all(starts):
                sample = self.trainer.datamodule.sample(self.hparams.init_tokens)
            for member, start in zip(self.members, starts):
                if start:
                    load_into(member.dictionary, Path(start))
                else:
                    member.dictionary.init_from_data(sample[member.input_key].to(self.device))
                broadcast_tensors_([*member.dictionary.parameters(), *member.dictionary.buffers()])
            self.initialised.fill_(True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["resample_generators"] = [member.generator.get_state() for member in self.members]
        checkpoint["resample_pools"] = [member.pool_state() for member in self.members]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for member, state in zip(self.members, checkpoint.get("resample_generators", [])):
            member.generator.set_state(state)
        for member, state in zip(self.members, checkpoint.get("resample_pools", [])):
            member.load_pool_state(state, self.global_rank)

    def on_train_start(self) -> None:
        self._loop_start = time.perf_counter()

    def on_train_end(self) -> None:
        self._check_divergence()  # the steps since the last check
        self.train_loop_seconds = time.perf_counter() - self._loop_start

    def sparsity_weight(self) -> float:
        ramp = self.hparams.sparsity_warmup_frac * self.hparams.total_steps
        return min(1.0, (self.global_step + 1) / ramp) if ramp > 0 else 1.0

    def _member_losses(self, batch: dict[str, torch.Tensor], weight: float) -> tuple[list[torch.Tensor], dict]:
        """Each member's loss and metrics on ``batch`` under the objective."""
        losses, metrics = [], {}
        if self.objective.on_contexts:
            pairs = zip(self.members, self._spliced_terms(batch["input_ids"]))
            results = [member.spliced_loss(self.objective, terms, weight) for member, terms in pairs]
        else:
            results = [member.training_loss(batch, weight) for member in self.members]
        for loss, member_metrics in results:
            losses.append(loss)
            metrics.update(member_metrics)
        return losses, metrics

    def _spliced_terms(self, input_ids: torch.Tensor) -> list[SplicedTerms]:
        """The clean and spliced runs of the datamodule's LM on ``input_ids`` (``sae.training.spliced``)."""
        session = self.trainer.datamodule.session
        if self._later is None:
            layers = n_layers(session.model.config)
            uses = self.objective.downstream_coeff > 0
            self._later = [downstream_hooks(hook, layers) if uses else [] for hook in self.hooks]
        members = [(hook, member.dictionary) for hook, member in zip(self.hooks, self.members)]
        return spliced_terms(session.model, input_ids, session.special_ids, members, self._later, self.objective.splice)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        weight = self.sparsity_weight()
        losses, metrics = self._member_losses(batch, weight)
        total = torch.stack(losses).sum()
        fvus = torch.stack([metrics[f"{member.prefix}/fvu"] for member in self.members])
        self.divergence.observe(self.global_step, torch.stack(losses), fvus)
        if self._logging_step():  # the only host synchronisations of a step, once every log_every_n_steps
            self._check_divergence()
            self._log_metrics(metrics, batch)
        if (self.global_step + 1) % self.hparams.histogram_every == 0:
            self._log_density_histograms()
        return total

    def _logging_step(self) -> bool:
        """True in the steps whose metrics Lightning writes to the logger (every ``log_every_n_steps``)."""
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _log_metrics(self, metrics: dict, batch: dict[str, torch.Tensor]) -> None:
        """Log this step's metrics (device tensors, read by the logger now) and feed the progress bar CPU values
        (Lightning reads progress-bar values at every step: a device tensor there would synchronise every step)."""
        metrics["train/lr"] = torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log_dict(metrics, on_step=True, on_epoch=False)
        if len(self.members) == 1:
            names = ["l0", "fvu", *(["kl"] if self.objective.on_contexts else [])]
            values = torch.stack([metrics[f"train/{name}"] for name in names]).cpu()
            for name, value in zip(names, values):
                self.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if self.objective.on_contexts:
            self._log_speed(batch["input_ids"].numel(), "tokens_per_s")
        else:
            self._log_speed(len(next(iter(batch.values()))))

    def _check_divergence(self) -> None:
        """Raise ``TrainingDiverged`` (on every process alike) if any member has diverged so far."""
        found = self.divergence.earliest()
        if found is None:
            return
        hp, member = self.hparams, self.members[found.member]
        if found.reason == FVU_HIGH:
            what = (
                f"the training diverged at step {found.step} (its FVU stayed above {hp.divergence_fvu:g} for "
                f"{hp.divergence_steps} steps, train.divergence_fvu and train.divergence_steps; then {found.value:.4g})"
            )
            after = "no dictionary or metrics were written"
        else:  # the step itself was skipped, so the weights never held a NaN
            what = f"the loss became {found.value} at step {found.step}"
            after = "the last good checkpoint is checkpoints/last.ckpt in the run directory"
        raise TrainingDiverged(f"{label(member.name)}{what}: the learning rate (train.lr={hp.lr}) is probably too "
                               f"high, or activations overflow (model.dtype); {after}")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        skip_non_finite_step(self.trainer.optimizers[0], list(self.members.parameters()))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for dictionary in self.dictionaries():
            dictionary.normalise_atoms_()

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Between optimizer steps, like after the previous batch, but after that step's checkpoint was written:
        # a run resumed from it resamples here just as the uninterrupted one does.
        hp = self.hparams
        step = self.global_step  # optimizer steps done so far
        if step > hp.resample_until * hp.total_steps:  # no resampling left: stop copying inputs into the pools
            for member in self.members:
                if len(member.recent_inputs):
                    member.make_pool(0)
        elif hp.resample_every and 0 < step and step % hp.resample_every == 0:
            optimizer = self.trainer.optimizers[0]
            for member in self.members:
                rows = len(batch[member.input_key])  # this process's share of a batch
                count = member.resample(member.resampling_inputs(batch), optimizer, hp.duplicate_cos, rows)
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

    def _log_speed(self, n: int, name: str = "acts_per_s") -> None:
        """Rows (or tokens) per second over the steps since the last call (``n`` per step); called after a host
        synchronisation, so on a GPU the time is that of the work done, not of the work queued."""
        now, step = time.perf_counter(), self.global_step
        if self._last_time is not None and step > self._last_step:
            rate = n * (step - self._last_step) / max(now - self._last_time, 1e-9)
            self.log(name, torch.tensor(rate), prog_bar=True, on_step=True, on_epoch=False)
        self._last_time, self._last_step = now, step

    def configure_optimizers(self):
        hp = self.hparams
        # fused: one kernel per step, and it can skip a step on the device (``skip_non_finite_step``)
        opt = torch.optim.Adam(self.members.parameters(), lr=hp.lr, betas=tuple(hp.betas), fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, hp.total_steps, hp.warmup_steps, hp.lr_decay_frac)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
