"""SAEBench's core metrics beside ours, one row per dictionary, as a Markdown table: from what
``evaluate.py run=<dir>`` (analysis=metrics) wrote under its ``out``.

    python experiments/saebench_core_table.py <out>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(path: Path, out: Path) -> str:
    saved = json.loads(path.read_text())
    m = saved["eval_result_metrics"]
    ours = json.loads((out / saved["sae_lens_id"] / "eval.json").read_text())["metrics"]
    cells = [
        saved["sae_lens_id"], m["sparsity"]["l0"],
        m["reconstruction_quality"]["explained_variance"], 1 - ours["fvu"],
        m["reconstruction_quality"]["mse"], ours["mse"],
        m["model_performance_preservation"]["ce_loss_score"], ours["ce_loss_recovered"],
        m["model_behavior_preservation"]["kl_div_score"], m["model_behavior_preservation"]["kl_div_with_sae"],
        m["shrinkage"]["l2_ratio"], m["shrinkage"]["relative_reconstruction_bias"],
        m["reconstruction_quality"]["cossim"],
        m["misc_metrics"]["frac_alive"], m["misc_metrics"]["average_max_decoder_cosine_sim"],
    ]
    return "| " + " | ".join(c if isinstance(c, str) else f"{c:.4g}" for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="evaluate.py's out directory")
    args = parser.parse_args()
    header = ["dictionary", "l0", "explained_variance (SAEBench)", "1 − fvu (ours)", "mse (SAEBench)", "mse (ours)",
              "ce_loss_score", "ce_loss_recovered (ours)", "kl_div_score", "kl_div_with_sae = kl_spliced", "l2_ratio",
              "relative_reconstruction_bias", "cossim", "frac_alive", "average_max_decoder_cosine_sim"]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for path in sorted((args.out / "saebench" / "core").glob("*_eval_results.json")):
        print(row(path, args.out))


if __name__ == "__main__":
    main()
