"""SAELens' own training of TopK, BatchTopK and JumpReLU on exactly the activations our training sees.

A benchmark, not a test: it answers "trained better than the peers?" on the stand-in model. SAELens is
not a dependency of this project; it lives in its own virtual environment, and this file has two halves, each run
by its own Python:

1. ``dump`` (our environment): the training batches one of our runs reads, in its order, written once to
   ``<out>/activations.npy`` (``[steps, batch, d_in]``, float16 as our activation cache stores them) and
   ``<out>/activations.json`` (the run's config and where the batches came from). It builds the run's own
   datamodule (``sae.training.run.lm_setup``) from the same overrides as ``train.py``, so the batches are our
   stream's: the training documents, context length, shuffle buffer and seed of the run, served from the
   activation cache (``stream.cache_dir``) when one is given, so the LM does not run again.
2. ``train`` (the SAELens environment): one SAELens dictionary per call, trained by SAELens' own ``SAETrainer``
   on those batches in that order (its data provider is an iterator over them), with SAELens' recommended
   settings for the architecture except the learning rate and the sparsity (the command line's), and saved
   with SAELens' own ``save_model`` (``cfg.json`` + ``sae_weights.safetensors``), which our ``evaluate.py``
   reads through its SAELens import.

    # once: the SAELens environment (outside the project; pin torch first so no CUDA wheels come)
    python -m venv <saelens-venv>
    <saelens-venv>/bin/pip install torch==2.13.0 && <saelens-venv>/bin/pip install sae-lens==6.54.12
    # our side: the batches of a 4M-token run at block 3 (the LM ran once, into the cache)
    PYTHONPATH=$PWD python experiments/saelens_training_benchmark.py dump --out <runs>/acts -- \\
        model.name_or_path=../shared/fixtures/neox-owt-14m data=text_files \\
        data.path=../shared/fixtures/text/openwebtext-1k.jsonl hook.layer=3 sae=topk \\
        stream.cache_dir=<runs>/act_cache
    # SAELens' side: one dictionary per call
    <saelens-venv>/bin/python experiments/saelens_training_benchmark.py train --acts <runs>/acts \\
        --architecture topk --k 8 --lr 3e-4 --out <runs>/bench/saelens/topk-k8-lr3e-4
    # both sides in one evaluation on the same held-out tokens (SAELens' cfg.json names no local text: give it)
    python evaluate.py run=<runs>/bench eval_tokens=12288 data.source=files \\
        data.path=../shared/fixtures/text/openwebtext-1k.jsonl model.name_or_path=../shared/fixtures/neox-owt-14m

docs/results/saelens.md has the grid, the table and the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACTS, META = "activations.npy", "activations.json"
HOOK_NAME = "blocks.{layer}.hook_resid_post"  # SAELens' (TransformerLens') name of our `resid` hook


def dump(out: Path, overrides: list[str]) -> None:
    """Write the training batches of the run ``overrides`` describe (our environment)."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    from sae.io.atomic import atomic_path, write_json
    from sae.training.config import register_schemas
    from sae.training.run import lm_setup, training_steps
    from sae.training.validation import validate

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=csv", *overrides])
    plans = validate(cfg)
    if len(plans) != 1:
        raise SystemExit("dump: give one dictionary's run (no `dictionaries` set)")
    datamodule = lm_setup(cfg, plans).datamodule
    datamodule.setup("fit")
    steps, hook = training_steps(cfg.train), plans[0].hook
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ACTS) as tmp:  # the project's one atomic write: whole or absent
        rows = None
        for step, batch in zip(range(steps), datamodule.make_stream()):
            acts = batch[hook.name].float().cpu().numpy()
            if rows is None:
                rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(steps, *acts.shape))
            rows[step] = acts
            if step % 500 == 0:
                print(f"dump: batch {step:,} / {steps:,}", flush=True)
        rows.flush()
        d_in = int(rows.shape[-1])
        del rows  # the memmap closed before the rename
    meta = {"steps": steps, "batch_size": cfg.train.batch_size, "d_in": d_in,
            "tokens": steps * cfg.train.batch_size, "hook": hook.name, "layer": hook.layer,
            "hook_name": HOOK_NAME.format(layer=hook.layer), "model": cfg.model.name_or_path,
            "context_length": cfg.data.context_length, "overrides": overrides,
            "config": OmegaConf.to_container(cfg, resolve=True)}
    write_json(out / META, meta)
    print(f"dump: {meta['tokens']:,} activations ({steps:,} batches of {cfg.train.batch_size}) -> {out / ACTS}")


# SAELens' recommended settings (its docs' "Training SAEs" page and its config defaults, sae-lens 6.54):
# TopK and BatchTopK train on raw activations with AuxK (aux_loss_coefficient 1), decoder rows rescaled into the
# codes and the heuristic decoder init (norm 0.1), all SAELens defaults; JumpReLU with Anthropic's setup, which the
# page recommends: tanh sparsity loss, bandwidth 2, initial threshold 0.1, the pre-activation loss 3e-6, activations
# normalised to mean norm sqrt(d_in), the L0 penalty warmed up over the whole run. Every run: Adam (0.9, 0.999), the
# runner's default batch of 4,096 activations, a constant rate decayed linearly to a tenth of it (lr_end) over the last
# 20% of steps (the docs' tutorial and Anthropic's recommendation), SAELens' dead-feature window.
SAELENS_BATCH = 4096
JUMPRELU = {"jumprelu_sparsity_loss_mode": "tanh", "jumprelu_tanh_scale": 4.0, "jumprelu_bandwidth": 2.0,
            "jumprelu_init_threshold": 0.1, "pre_act_loss_coefficient": 3e-6,
            "normalize_activations": "expected_average_only_in"}
NORM_ESTIMATE_BATCHES = 16  # 65,536 activations for JumpReLU's norm estimate (our train.init_tokens)


def batches(acts_dir: Path, batch_size: int):
    """The dumped batches in their order, regrouped into ``batch_size`` rows (float32): SAELens' data provider."""
    import numpy as np
    import torch

    rows = np.load(acts_dir / ACTS, mmap_mode="r")
    flat = rows.reshape(-1, rows.shape[-1])
    for start in range(0, len(flat) - batch_size + 1, batch_size):
        yield torch.from_numpy(np.asarray(flat[start : start + batch_size], dtype=np.float32))


def saelens_sae(args: argparse.Namespace, meta: dict, steps: int):
    """A SAELens training SAE of ``args.architecture`` at the recommended settings, with ``args``' sparsity."""
    import sae_lens as sl

    common = {"d_in": meta["d_in"], "d_sae": args.expansion * meta["d_in"], "device": "cpu"}
    if args.architecture in ("topk", "batchtopk"):
        if args.k is None:
            raise SystemExit(f"train: --k is needed for {args.architecture}")
        if args.architecture == "topk":
            cfg = sl.TopKTrainingSAEConfig(k=int(args.k), **common)
        else:
            cfg = sl.BatchTopKTrainingSAEConfig(k=args.k, **common)
    else:
        if args.l0_coefficient is None:
            raise SystemExit("train: --l0-coefficient is needed for jumprelu")
        cfg = sl.JumpReLUTrainingSAEConfig(l0_coefficient=args.l0_coefficient, l0_warm_up_steps=steps,
                                           **JUMPRELU, **common)
    for key, value in {"model_name": meta["model"], "hook_name": meta["hook_name"],
                       "context_size": meta["context_length"], "dataset_path": meta["config"]["data"]["path"]}.items():
        cfg.metadata[key] = value
    model = {"topk": sl.TopKTrainingSAE, "batchtopk": sl.BatchTopKTrainingSAE, "jumprelu": sl.JumpReLUTrainingSAE}
    return model[args.architecture](cfg)


def train(args: argparse.Namespace) -> None:
    """Train one SAELens dictionary on the dumped batches with SAELens' own trainer; save it as SAELens does."""
    import time

    import sae_lens as sl
    import torch
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(args.seed)
    meta = json.loads((args.acts / META).read_text())
    samples = min(meta["tokens"], args.tokens or meta["tokens"]) // SAELENS_BATCH * SAELENS_BATCH
    steps = samples // SAELENS_BATCH
    sae = saelens_sae(args, meta, steps)
    trainer_cfg = SAETrainerConfig(total_training_samples=samples, train_batch_size_samples=SAELENS_BATCH, lr=args.lr,
                                   lr_end=args.lr / 10, lr_decay_steps=steps // 5, device="cpu",
                                   logger=sl.LoggingConfig(log_to_wandb=False),
                                   n_batches_for_norm_estimate=NORM_ESTIMATE_BATCHES)
    trainer = sl.SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches(args.acts, SAELENS_BATCH))
    if sae.cfg.normalize_activations == "expected_average_only_in":  # estimated on a separate pass, as its runner does
        trainer.activation_scaler.estimate_scaling_factor(meta["d_in"], batches(args.acts, SAELENS_BATCH),
                                                          NORM_ESTIMATE_BATCHES)
    start = time.perf_counter()
    trained = trainer.fit()
    seconds = time.perf_counter() - start
    trained.save_inference_model(str(args.out))  # what SAELens' runner writes as its final output
    record = {"architecture": args.architecture, "k": args.k, "l0_coefficient": args.l0_coefficient, "lr": args.lr,
              "tokens": samples, "steps": steps, "batch_size": SAELENS_BATCH, "train_seconds": seconds,
              "train_l0": trained.cfg.metadata.l0, "sae_lens_version": sl.__version__, "acts": str(args.acts)}
    (args.out / "benchmark.json").write_text(json.dumps(record, indent=2))
    print(
        f"train: {args.architecture} lr {args.lr:g} -> {args.out} ({seconds:.0f} s, training L0 {record['train_l0']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="our environment: write a run's training batches")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    t = sub.add_parser("train", help="the SAELens environment: train one SAELens dictionary on the batches")
    t.add_argument("--acts", type=Path, required=True, help="the directory `dump` wrote")
    t.add_argument("--architecture", choices=["topk", "batchtopk", "jumprelu"], required=True)
    t.add_argument("--k", type=float, help="TopK / BatchTopK: active latents per input")
    t.add_argument("--l0-coefficient", type=float, help="JumpReLU: the L0 penalty's coefficient")
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--expansion", type=int, default=4, help="latents / d_in (ours: sae.ratio)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--tokens", type=int, help="train on the first this many activations only (a pilot)")
    t.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.out, args.overrides)
    else:
        train(args)


if __name__ == "__main__":
    main()
