"""Typed schemas of the training config's fixed groups, registered with Hydra's ConfigStore.

Each group's YAML (``conf/<group>/*.yaml``) names its schema first in its defaults list and holds the values: the
schema gives each field its type and its meaning (here), the YAML its one default. A value of the wrong type on
the command line (``train.tokens=abc``) then fails as Hydra composes the config, and ``sae.cli`` reports that in one
line. The open-ended groups stay untyped: ``sae`` (a variant takes the settings it declares; checked by
``sae.training.validation``), ``experiment`` (presets may set anything) and ``dictionaries``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sae.lm.text_settings import TextSettings


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    """A hub id or a local model directory."""
    dtype: str = MISSING
    """The LM's weights: float32, bfloat16 or float16 (activations are read as float32)."""


@dataclass
class HookConfig:
    layer: int = MISSING
    """The block, 0-based."""
    site: str = MISSING
    """resid (block output), mlp (MLP neurons after the nonlinearity), mlp_out or attn_out."""


@dataclass
class TextDataConfig(TextSettings):
    """The text settings (``sae.lm.text_settings.TextSettings``: source, path, split, text_column, context_length,
    heldout_fraction, streaming) and training's own keys."""

    eval_tokens: int = MISSING
    """Held-out tokens for metrics.json (at most; all held-out text if fewer), drawn across the held-out documents."""
    token_store_dir: str | None = MISSING
    """Where the tokenized training text is stored once and reused (null: <HF datasets cache>/sae-token-store)."""
    tokenize_procs: int | None = MISSING
    """Processes tokenizing the text into the token store (null: the usable CPUs, at most 8)."""


@dataclass
class ToyDataConfig:
    source: str = MISSING
    """Always toy."""
    n_features: int = MISSING
    """Planted ground-truth directions."""
    d: int = MISSING
    """Their dimension (the dictionary's input width)."""
    avg_active: float = MISSING
    """Mean number of features firing per sample."""
    decay: float = MISSING
    """Feature i fires with probability proportional to decay**i."""
    correlated: bool = MISSING
    """Features fire together through a random correlation matrix."""
    seed: int = MISSING
    """Seeds the ground truth and the sample stream."""
    eval_tokens: int = MISSING
    """Fresh samples for metrics.json."""


@dataclass
class StreamConfig:
    lm_batch_size: int = MISSING
    """Contexts per LM forward."""
    buffer_size: int = MISSING
    """Activations shuffled together (per process) before they are cut into batches."""
    cache_dir: str | None = MISSING
    """A directory: activations are written there by the first run, read by later ones (null: none)."""
    cache_dtype: str = MISSING
    """How cached activations are stored: float16, bfloat16 or float32."""


@dataclass
class TrainConfig:
    tokens: int = MISSING
    """Activation vectors to train on; the run lasts tokens / batch_size steps."""
    batch_size: int = MISSING
    """Activations per optimiser step (over all processes)."""
    lr: float = MISSING
    """Adam's learning rate after warm-up."""
    betas: list[float] = MISSING
    """Adam's betas."""
    warmup_steps: int = MISSING
    """Linear learning-rate warm-up."""
    lr_decay_frac: float = MISSING
    """Linear decay to 0 over this last fraction of the steps."""
    sparsity_warmup_frac: float = MISSING
    """The sparsity term ramps in linearly over this first fraction of the steps."""
    dead_window: int = MISSING
    """A feature is dead after this many activations without firing."""
    init_tokens: int = MISSING
    """Activations that set the normalisation scale and the decoder bias."""
    resample_every: int = MISSING
    """Steps between resampling stale atoms (0: never)."""
    resample_until: float = MISSING
    """No resampling after this fraction of the run."""
    duplicate_cos: float = MISSING
    """When resampling, also re-seed one of each pair of atoms this similar."""
    resample_pool: int = MISSING
    """Resampling re-seeds atoms from this many of the latest training inputs."""
    init_from: str | None = MISSING
    """A finished run's directory whose dictionaries this run starts from, weights and normalisation included (its
    only dictionary, or ``<dir>/<name>`` for each of a set; same variant, size, hook and model), then trains on
    ``tokens`` more: MSE for most of the tokens, then a KL objective for the last few (sae.training.warm_start).
    null: a fresh initialisation."""
    divergence_fvu: float = MISSING
    """A run whose training FVU stays above this for divergence_steps steps in a row has diverged and stops."""
    divergence_steps: int = MISSING
    """See divergence_fvu (checked every trainer.log_every_n_steps steps, like a non-finite loss)."""


@dataclass
class ObjectiveConfig:
    name: str = MISSING
    """mse (reconstruction on shuffled activations), kl, kl_mse or e2e_ds (token contexts through the LM)."""
    splice: str = MISSING
    """each (every dictionary of a set spliced alone, as evaluate.py measures it) or all (the set at once)."""
    kl_coeff: float = MISSING
    """Weight of KL(clean || spliced), per-token mean (the KL objectives)."""
    mse_coeff: float = MISSING
    """Weight of the reconstruction loss (mse: always 1; kl_mse: the mix)."""
    downstream_coeff: float = MISSING
    """Weight of the later block outputs' normalised squared error (e2e_ds)."""


@dataclass
class TrainerConfig:
    accelerator: str = MISSING
    """auto, cpu or gpu (Lightning's)."""
    devices: Any = MISSING
    """Devices (processes) training one dictionary: a number, a list, or auto."""
    num_nodes: int = MISSING
    """Machines."""
    strategy: str = MISSING
    """auto, or ddp for several devices."""
    precision: str = MISSING
    """Lightning's precision, e.g. 32-true or bf16-mixed."""
    log_every_n_steps: int = MISSING
    """Steps between logged training metrics."""
    checkpoint_every_n_steps: int = MISSING
    """Steps between checkpoints (checkpoints/last.ckpt, what resume=true continues from)."""


@dataclass
class WandbLoggerConfig:
    kind: str = MISSING
    """wandb."""
    project: str = MISSING
    """The W&B project the runs are logged to."""
    entity: str | None = MISSING
    """The W&B user or team (null: your default entity)."""
    group: str | None = MISSING
    """null: the sweep's directory name in a multirun, else none."""
    mode: str = MISSING
    """auto (online when logged in), online, offline or disabled."""


@dataclass
class CsvLoggerConfig:
    kind: str = MISSING
    """csv."""


@dataclass
class RunConfig:
    """The top level of ``conf/config.yaml``."""

    seed: int = MISSING
    """Seeds the dictionary's initialisation, the context order, the shuffle and resampling."""
    resume: bool = MISSING
    """Continue the run in hydra.run.dir from its checkpoints/last.ckpt."""
    dictionaries: Any = MISSING
    """null, or a list of {name, hook, sae} entries trained together (sae.training.plan)."""
    # the groups, each typed by its own schema (``sae`` is open-ended)
    model: Any = MISSING
    """The frozen LM: model=<name> picks conf/model/<name>.yaml."""
    hook: Any = MISSING
    """Where activations are read (conf/hook/)."""
    sae: Any = MISSING
    """The dictionary variant and its settings: sae=<variant> picks conf/sae/<variant>.yaml (untyped)."""
    data: Any = MISSING
    """The text (pile10k: the hub; text_files: local files) or toy data."""
    stream: Any = MISSING
    """Text to shuffled batches of activations, and the activation cache (conf/stream/)."""
    train: Any = MISSING
    """Optimisation: tokens, batch size, learning rate, resampling (conf/train/)."""
    objective: Any = MISSING
    """What the dictionaries minimise: mse, kl, kl_mse or e2e_ds (conf/objective/)."""
    trainer: Any = MISSING
    """The Lightning Trainer: hardware, processes, precision, logging and checkpoint cadence (conf/trainer/)."""
    logger: Any = MISSING
    """wandb or csv (conf/logger/)."""


# Keys that moved when the data and train groups were split into the objects they configure: the old name on the
# command line gets one line naming the new one (sae.cli).
MOVED = {
    **{f"data.{k}": f"stream.{k}" for k in ("lm_batch_size", "buffer_size", "cache_dir", "cache_dtype")},
    **{f"train.{k}": f"trainer.{k}" for k in ("accelerator", "devices", "num_nodes", "strategy", "precision",
                                             "log_every_n_steps", "checkpoint_every_n_steps")},
}

SCHEMAS = {
    ("model", "model_schema"): ModelConfig,
    ("hook", "hook_schema"): HookConfig,
    ("data", "text_schema"): TextDataConfig,
    ("data", "toy_schema"): ToyDataConfig,
    ("stream", "stream_schema"): StreamConfig,
    ("train", "train_schema"): TrainConfig,
    ("objective", "objective_schema"): ObjectiveConfig,
    ("trainer", "trainer_schema"): TrainerConfig,
    ("logger", "wandb_schema"): WandbLoggerConfig,
    ("logger", "csv_schema"): CsvLoggerConfig,
    (None, "run_schema"): RunConfig,
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent), before a config is composed."""
    store = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        store.store(group=group, name=name, node=node)


register_schemas()
