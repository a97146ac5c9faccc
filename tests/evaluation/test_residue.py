"""analysis=residue: a planted dictionary that breaks one token id ranks that token first; the outputs; bad settings."""

import json

import torch
from conftest import run_cli, run_in_process, tiny_model, tiny_overrides
from torch import nn

from sae.evaluation.residue import token_scores, top_records, top_share
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture

HOOK = HookPoint(0, "resid")
SPECIAL = [0]
BROKEN = 7


class Planted(nn.Module):
    """Reconstructs every activation exactly except those of token ``BROKEN`` (recognised by value), which it
    replaces by a far-off vector."""

    def __init__(self, broken_rows: torch.Tensor):
        super().__init__()
        self.b_dec = nn.Parameter(torch.zeros(broken_rows.shape[-1]))
        self.broken_rows = broken_rows

    def forward(self, x):
        distance = torch.cdist(x.reshape(-1, x.shape[-1]), self.broken_rows).min(-1).values.reshape(x.shape[:-1])
        return torch.where((distance < 1e-5).unsqueeze(-1), -10 * x, x)


class Tokens:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_a_dictionary_breaking_one_token_ranks_it_first():
    model = tiny_model().requires_grad_(False)
    torch.manual_seed(3)
    contexts = torch.randint(2, 20, (6, 16))
    contexts[:, 0] = 0
    x = capture(model, [HOOK], contexts)[HOOK]
    planted = Planted(x[contexts == BROKEN])
    scores = token_scores(model, planted, HOOK, contexts, SPECIAL, batch_size=4, predictions=3)
    assert scores.kl.shape == (6, 15)
    records = top_records(scores, top=5, window=3, tokenizer=Tokens())
    assert records[0]["token_id"] == BROKEN and records[0]["kl"] > 0.01
    assert records[0]["fvu"] > 1 and all(r["kl"] >= s["kl"] for r, s in zip(records, records[1:]))
    row, pos = records[0]["context"], records[0]["position"]
    assert int(contexts[row, pos]) == BROKEN and records[0]["next_token_id"] == int(contexts[row, pos + 1])
    untouched = scores.kl[:, :][(contexts[:, :-1] != BROKEN)]
    assert scores.fvu[contexts[:, :-1] != BROKEN].max() < 1e-10  # exact elsewhere
    assert top_share(scores.kl, 0.01) > 0 and untouched.numel() > 0


def test_top_share():
    assert top_share(torch.tensor([0.0] * 99 + [5.0]), 0.01) == 1.0
    assert abs(top_share(torch.ones(200), 0.01) - 0.01) < 1e-9


def test_residue_study_writes_jsonl_page_and_summary(tiny_lm_dir, tiny_text, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train.py", *tiny_overrides(tiny_lm_dir, tiny_text, run), "sae=topk", "sae.k=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("evaluate.py", f"run={run}", "analysis=residue", "analysis.top=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (run / "eval" / "residue" / "run" / "tokens.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert (
        len(records) == 20
        and records[0]["rank"] == 1
        and {"clean_top", "spliced_top", "fvu", "before"} <= set(records[0])
    )
    summary = json.loads((run / "eval" / "residue" / "summary.json").read_text())["run"]
    assert 0 < summary["top_share"] <= 1 and "tiny-neox" in summary["model"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(summary["kl_mean"] - metrics["kl_spliced"]) < 1e-4 * max(1.0, metrics["kl_spliced"]) + 1e-6
    assert "<table>" in (run / "eval" / "residue" / "run" / "index.html").read_text()
    bad = run_in_process("evaluate.py", f"run={run}", "analysis=residue", "analysis.top=0", "analysis.share_frac=2")
    lines = bad.stderr.strip().splitlines()
    assert (
        bad.returncode != 0 and len(lines) == 1 and "analysis.top=0 must be" in lines[0] and "share_frac=2" in lines[0]
    )
