"""The perplexity-gap table and the CE-increase-vs-L0 figure, by training objective."""

from sae.evaluation.perplexity import objective_of, plot_ce_vs_l0, ppl_table


def _row(name, objective, l0, ce_spliced, kind="dictionary"):
    return {"name": name, "kind": kind, "layer": 3, "site": "resid", "objective": objective, "l0": l0, "fvu": 0.1,
            "kl_spliced": ce_spliced - 4.0, "ce_clean": 4.0, "ce_spliced": ce_spliced, "ppl_clean": 2.718281828 ** 4.0,
            "ppl_spliced": 2.718281828 ** ce_spliced}


def test_objective_comes_from_the_train_record():
    assert objective_of({"train": {"objective": {"name": "kl"}}}) == "kl"
    assert objective_of({"train": {"tokens": 1}}) == "mse"  # runs from before the objective group
    assert objective_of({"baseline": "pca", "train": {}}) is None and objective_of({}) is None


def test_table_and_figure(tmp_path):
    rows = [_row("mse-k8", "mse", 8.0, 4.1), _row("kl-k8", "kl", 8.0, 4.02), _row("kl-k16", "kl", 16.0, 4.01),
            _row("pca", None, 128.0, 4.0, kind="pca")]
    table = ppl_table(rows).splitlines()
    assert len(table) == 5 and "pca" not in ppl_table(rows)  # header, rule, the three dictionaries
    mse = next(line for line in table if line.startswith("| mse-k8 "))
    gap = 2.718281828 ** 4.1 - 2.718281828 ** 4.0
    assert f"| {2.718281828 ** 4.0:.2f} | {2.718281828 ** 4.1:.2f} | {gap:+.2f} |" in mse and "| mse |" in mse
    plot_ce_vs_l0(rows, tmp_path / "ce_vs_l0.png", "model: test")
    assert (tmp_path / "ce_vs_l0.png").read_bytes()[:4] == b"\x89PNG"
