"""Sweep L1 coefficient x dictionary ratio on toy data and draw the interim report's heat maps.

    python experiments/toy_sweep.py --out toy_sweep [--l1 0.03 0.1 0.3 1] [--ratios 0.5 1 2 4 8] [--steps 4000]
        [override ...]

Each cell is a real `train.py experiment=toy` run (in <out>/runs/l1=<l1>_ratio=<ratio>/). Writes
<out>/toy_sweep.csv, <out>/mmcs.png and <out>/dead_frac.png, and prints the best (l1, ratio) by MMCS.
Extra arguments are Hydra overrides applied to every run (e.g. data.correlated=true).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae.errors import ConfigError, exit_on_config_error  # noqa: E402
from sae.training.config import register_schemas  # noqa: E402


def cell_name(l1: float, ratio: float) -> str:
    return f"l1={l1:g}_ratio={ratio:g}"


def cell_config(l1: float, ratio: float, steps: int, overrides: list[str]):
    """The composed ``train.py experiment=toy`` config of one cell."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("config", overrides=[
                "experiment=toy", "logger=csv", f"sae.l1_coeff={l1}", f"sae.ratio={ratio}",
                f"train.tokens={steps * 256}", "train.batch_size=256", *overrides,
            ])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad override among {overrides}: {err}".replace("\n", " ")) from err


def validate_cells(cells: dict, out: Path) -> None:
    """Check every cell's config and run directory before training any; all problems in one ConfigError."""
    from sae.io.checkpoints import resume_checkpoint
    from sae.training.run import check_launch
    from sae.training.validation import config_problems, validate

    problems = []
    for name, cfg in cells.items():
        found = config_problems(cfg)
        checks = [] if found else [lambda: validate(cfg)]
        checks += [
            lambda: check_launch(cfg, run_info(out, name)),
            lambda: resume_checkpoint(out / "runs" / name, cfg.resume),
        ]
        for check in checks:
            try:
                check()
            except ConfigError as err:
                found.append(str(err))
        problems += found
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))  # a problem shared by every cell is said once


def run_info(out: Path, name: str):
    from sae.training.run import RunInfo

    return RunInfo(out / "runs" / name, name, group=out.name, sweep=True)


def heatmap(table: np.ndarray, l1s: list[float], ratios: list[float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(ratios) + 2, 0.8 * len(l1s) + 1.5))
    im = ax.imshow(table, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    ax.set_yticks(range(len(l1s)), [f"{v:g}" for v in l1s])
    ax.set_xlabel("dictionary size / input width")
    ax.set_ylabel("l1_coeff")
    middle = (table.min() + table.max()) / 2
    for i in range(len(l1s)):
        for j in range(len(ratios)):
            colour = "k" if table[i, j] > middle else "w"
            ax.text(j, i, f"{table[i, j]:.3f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(title + " (toy data)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@exit_on_config_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("toy_sweep"))
    parser.add_argument("--l1", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])  # brackets experiment=toy's 0.5
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=4000, help="training steps of batch 256 per cell")
    argv = sys.argv[1:]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # Hydra overrides, wherever they stand
    args = parser.parse_args([a for a in argv if a not in overrides])
    if args.steps < 1:
        raise ConfigError(f"--steps={args.steps} must be >= 1")
    cells = {cell_name(l1, r): cell_config(l1, r, args.steps, overrides) for l1 in args.l1 for r in args.ratios}
    validate_cells(cells, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    from sae.training.run import train

    for l1 in args.l1:
        for ratio in args.ratios:
            name = cell_name(l1, ratio)
            m = train(cells[name], run_info(args.out, name))
            rows.append(
                {
                    "l1_coeff": l1,
                    "ratio": ratio,
                    **{k: m[k] for k in ("mmcs", "frac_recovered", "dead_frac", "l0", "fvu")},
                }
            )
            print(
                f"l1={l1:g} ratio={ratio:g}: mmcs={m['mmcs']:.4f} dead_frac={m['dead_frac']:.3f} l0={m['l0']:.1f}",
                flush=True,
            )
    with open(args.out / "toy_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shape = (len(args.l1), len(args.ratios))
    for key, title in (("mmcs", "MMCS with the ground truth"), ("dead_frac", "fraction of dead atoms")):
        heatmap(np.array([r[key] for r in rows]).reshape(shape), args.l1, args.ratios, title, args.out / f"{key}.png")
    best = max(rows, key=lambda r: r["mmcs"])
    print(f"best: l1_coeff={best['l1_coeff']:g} ratio={best['ratio']:g} (mmcs {best['mmcs']:.4f}, "
          f"dead {best['dead_frac']:.3f}); table and heat maps in {args.out}/")


if __name__ == "__main__":
    main()
