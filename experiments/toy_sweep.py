"""Sweep L1 coefficient x dictionary ratio on toy data and draw the interim report's heat maps.

    python experiments/toy_sweep.py --out toy_sweep [--l1 0.01 0.03 0.1 0.3] [--ratios 0.5 1 2 4 8] [--steps 4000]
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

from sae.errors import exit_on_config_error  # noqa: E402


def run_cell(l1: float, ratio: float, steps: int, overrides: list[str], out: Path) -> dict:
    """Train one toy dictionary and return its metrics."""
    from hydra import compose, initialize_config_dir

    from sae.train import RunInfo, train

    name = f"l1={l1:g}_ratio={ratio:g}"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=toy", "logger=csv", f"sae.l1_coeff={l1}", f"sae.ratio={ratio}",
            f"train.tokens={steps * 256}", "train.batch_size=256", *overrides,
        ])
    return train(cfg, RunInfo(out / "runs" / name, name, group=out.name))


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
    parser.add_argument("--l1", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=4000, help="training steps of batch 256 per cell")
    args, overrides = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for l1 in args.l1:
        for ratio in args.ratios:
            m = run_cell(l1, ratio, args.steps, overrides, args.out)
            rows.append({"l1_coeff": l1, "ratio": ratio, **{k: m[k] for k in ("mmcs", "frac_recovered", "dead_frac", "l0", "fvu")}})
            print(f"l1={l1:g} ratio={ratio:g}: mmcs={m['mmcs']:.4f} dead_frac={m['dead_frac']:.3f} l0={m['l0']:.1f}", flush=True)
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
