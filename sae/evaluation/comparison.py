"""The paper's matched comparison: each dictionary beside every baseline kept to the dictionary's L0, one row each."""

from __future__ import annotations

METRICS = ("fvu", "kl_spliced", "ce_diff")  # ce_diff = ce_spliced - ce_clean (nats per token)


def matched_k(l0: float) -> int:
    """The top-k a baseline keeps to match a dictionary of mean L0 ``l0``: the rounded L0, at least 1."""
    return max(1, round(float(l0)))


def _value(row: dict, metric: str) -> float:
    if metric == "ce_diff":
        return float(row["ce_spliced"]) - float(row["ce_clean"])
    return float(row[metric])


def compare(rows: list[dict]) -> list[dict]:
    """One row per dictionary of ``eval.csv``'s ``rows``: its FVU, spliced KL and CE difference beside those of each
    ``<kind>_topk`` baseline at the same hook with k = ``matched_k`` of its L0, and ``kl_lowest`` (True when its
    KL is below every such baseline's; None without baselines). Baselines missing at that k are left out."""
    table = []
    for d in (r for r in rows if r["kind"] == "dictionary"):
        k = matched_k(d["l0"])
        at_k = [r for r in rows if r["kind"].endswith("_topk") and (r["layer"], r["site"]) == (d["layer"], d["site"])
                and int(r["k"]) == k]
        row = {"layer": d["layer"], "site": d["site"], "name": d["name"], "l0": float(d["l0"]), "k": k,
               "ce_loss_recovered": float(d["ce_loss_recovered"])}
        for metric in METRICS:
            row[f"{metric}_dictionary"] = _value(d, metric)
            for b in at_k:
                row[f"{metric}_{b['kind']}"] = _value(b, metric)
        row["kl_lowest"] = all(row["kl_spliced_dictionary"] < _value(b, "kl_spliced") for b in at_k) if at_k else None
        table.append(row)
    return sorted(table, key=lambda r: (int(r["layer"]), r["site"], r["l0"]))


def markdown(table: list[dict]) -> str:
    """``compare``'s rows as a Markdown table: for each metric, dictionary / each top-k baseline."""
    kinds = sorted(
        {key.removeprefix("fvu_") for r in table for key in r if key.startswith("fvu_") and key != "fvu_dictionary"}
    )
    names = " / ".join(["dict", *(k.removesuffix("_topk") + "-k" for k in kinds)])
    header = ["layer", "dictionary", "L0", "k", f"FVU: {names}", f"kl_spliced: {names}", f"CE spliced − clean: {names}",
              "CE recovered: dict", "dict KL lowest"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cells = [str(r["layer"]), r["name"], f"{r['l0']:.1f}", str(r["k"])]
        for metric, fmt in (("fvu", "{:.3f}"), ("kl_spliced", "{:.4f}"), ("ce_diff", "{:.4f}")):
            values = [r.get(f"{metric}_{kind}") for kind in ["dictionary", *kinds]]
            cells.append(" / ".join("–" if v is None else fmt.format(v) for v in values))
        cells += [f"{r['ce_loss_recovered']:.4f}", {True: "yes", False: "**no**", None: "–"}[r["kl_lowest"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
