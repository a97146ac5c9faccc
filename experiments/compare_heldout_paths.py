"""One trained dictionary's held-out metrics computed both ways: chunked from the final hidden states (the default)
and from the full ``[positions, vocabulary]`` logits, on the same held-out text; prints the two and their times.

    python experiments/compare_heldout_paths.py <run dir> [--out both.json]

Run it again with ``PYTHONPATH=<a checkout of an older commit>`` (where ``heldout_metrics_many`` has no
``from_states``: one way) to compare against older code.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

from sae.evaluation.entries import eval_tokens, session_for
from sae.evaluation.heldout import heldout_metrics_many
from sae.io.saving import load, read_meta
from sae.lm.hooks import HookPoint

SHOWN = ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "ce_loss_recovered", "kl_spliced", "fvu",
         "l0", "n_tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory with one dictionary")
    parser.add_argument("--out", type=Path, default=None, help="write every metric of each way here (JSON)")
    args = parser.parse_args()
    meta = read_meta(args.run)
    session = session_for(meta, "cpu", 0)
    session.prepare_text()
    contexts = session.eval_contexts(eval_tokens(meta))
    hook = HookPoint(meta["hook"]["layer"], meta["hook"]["site"])
    dictionary = load(args.run)
    ways = [{"from_states": True}, {"from_states": False}]
    if "from_states" not in inspect.signature(heldout_metrics_many).parameters:
        ways = [{}]  # older code: the logits path only
    results = {}
    for way in ways:
        start = time.perf_counter()
        metrics = heldout_metrics_many(session.model, {"d": dictionary}, hook, contexts, session.special_ids, **way)
        results[str(way or "logits (older code)")] = {**metrics["d"], "seconds": time.perf_counter() - start}
    for name, metrics in results.items():
        print(name, " ".join(f"{k} {metrics[k]:.6f}" for k in (*SHOWN, "seconds")))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
