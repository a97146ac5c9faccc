"""Feature analysis: collection on a planted feature against hand computation, the scores, the dashboard in Chromium."""

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import WORDS, feature_settings, make_tokenizer, run_cli, tiny_meta, tiny_model

from sae.dictionaries import build
from sae.features.monosemanticity import summarise, token_scores
from sae.features.records import Collector
from sae.io.saving import save_dictionary
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture as read_activations
from sae.lm.reader import token_mask
from sae.lm.session import LMSession
from sae.lm.text import pack_contexts

PLANTED = WORDS.index("cat") + 2  # the token id the planted feature fires on
HOOK = HookPoint(1, "resid")
CHROMIUM = Path("/usr/bin/chromium")


def planted_model():
    """The tiny GPT-NeoX with residual dimension 0 cleared in every embedding but the planted token's (set to 10)."""
    model = tiny_model()
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[:, 0] = 0.0
        model.gpt_neox.embed_in.weight[PLANTED, 0] = 10.0
    return model


def planted_dictionary():
    """Tied ReLU, 4 atoms: atom 0 is residual dimension 0 with threshold 5, so it fires on the planted token only."""
    torch.manual_seed(0)
    dictionary = build("relu_tied", 32, 4, l1_coeff=0.0)
    with torch.no_grad():
        dictionary.W_dec[0] = torch.nn.functional.one_hot(torch.tensor(0), 32).float()
        dictionary.b_enc[0] = -5.0
    return dictionary


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tiny_text):
    """A model directory with the planted token and a dictionary directory recording it."""
    root = tmp_path_factory.mktemp("planted")
    make_tokenizer(root / "lm")
    planted_model().save_pretrained(root / "lm")
    meta = tiny_meta(root / "lm", tiny_text, HOOK.layer)
    save_dictionary(planted_dictionary(), root / "run", meta)
    return root


def test_monosemanticity_scores():
    mass = torch.tensor([[4.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # tokens x features
    scores = token_scores(mass)
    assert scores["top_token_share"].tolist() == pytest.approx([1.0, 0.25, 0.0])
    assert scores["token_entropy"][:2].tolist() == pytest.approx([0.0, math.log(4)])
    assert math.isnan(scores["token_entropy"][2])
    summary = summarise(scores, torch.tensor([True, True, False]), torch.tensor([0.1, 0.4, 0.0]))
    assert summary["top_token_share"] == pytest.approx(0.625)
    assert summary["token_entropy"] == pytest.approx(math.log(4) / 2)
    assert summary["frac_top_token_over_half"] == 0.5 and summary["live_features"] == 2


def test_collection_on_planted_feature(tiny_text):
    model, dictionary = planted_model(), planted_dictionary()
    tokenizer = make_tokenizer(Path(tiny_text).parent / "tok")
    docs = [json.loads(line)["text"] for line in Path(tiny_text).read_text().splitlines()]
    contexts = pack_contexts(docs[-6:], tokenizer, 32)
    collector = Collector(
        LMSession.of_model(model, [0]),
        dictionary,
        HOOK,
        contexts,
        feature_settings(top_k=5, window=3, causal_contexts=3),
    )
    rec = collector.record(0)
    ordinary = token_mask(contexts, [0])
    planted = (contexts == PLANTED) & ordinary
    x = read_activations(model, [HOOK], contexts)[HOOK]
    hand = torch.relu(x[..., 0] - 5.0) * ordinary
    assert rec["density"] == pytest.approx(planted.sum().item() / ordinary.sum().item())
    assert rec["top_token_share"] == 1.0 and rec["token_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert rec["top_tokens"][0][0] == PLANTED and rec["max"] == pytest.approx(hand.max().item(), rel=1e-5)
    assert all(ex["tokens"][ex["focus"]] == PLANTED for ex in rec["top"])
    assert [ex["activation"] for ex in rec["top"]] == pytest.approx(hand.flatten().topk(5).values.tolist(), abs=1e-3)
    assert sum(map(sum, (s["counts"] for s in rec["histogram"]["stacks"]))) == planted.sum().item()
    assert rec["causal"]["contexts"] == 3 and len(rec["direct"]["up"]) == 10


@pytest.fixture(scope="module")
def features_out(planted_run) -> Path:
    """``evaluate.py analysis=features`` on the planted run, once for the tests that read its output (each fails,
    never skips, when it cannot be built)."""
    proc = run_cli(
        "evaluate.py", f"run={planted_run / 'run'}", "analysis=features", "baseline_tokens=256", "analysis.figures=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return planted_run / "run" / "eval"


def test_dashboard_from_cli(features_out):
    out = features_out
    with open(out / "monosemanticity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["dictionary", "neurons", "pca"]
    assert list(rows[0])[:2] == ["method", "top_token_share"]
    planted = json.loads((out / "features" / "dictionary.json").read_text())["features"][0]
    assert planted["top_token_share"] == 1.0
    assert (out / "figures" / "dictionary" / "0.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "dashboard" / "dictionary" / "0.html").is_file() and (out / "dashboard" / "index.html").is_file()


def _dump_dom(page: Path, tmp: Path) -> str:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp}",
    ]
    proc = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install chromium (.ci/run does)"
)
def test_dashboard_in_chromium(features_out, tmp_path):
    dashboard = features_out / "dashboard"
    index = _dump_dom(dashboard / "index.html", tmp_path / "profile")
    assert "<table id=\"features\"" in index and "dictionary/0.html" in index
    page = _dump_dom(dashboard / "dictionary" / "0.html", tmp_path / "profile")
    top = json.loads((features_out / "features" / "dictionary.json").read_text())["features"][0]["top"][0]
    focus = "<span class=\"focus\""
    assert focus in page and f"{top['activation']:.3g}: " in page
    assert page.count(">cat</span>") >= 1 and "Direct path" in page and "Causal" in page


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install chromium (.ci/run does)"
)
def test_context_view_in_chromium(tmp_path):
    """A context with line breaks stays on one line in the browser, its breaks shown as ↵ (a tab as ⇥), and the
    activating token is marked inside it (bold, underlined, outlined)."""
    from sae.features.dashboard import _page, context_html

    names = {0: "The", 1: " cat", 2: "\n", 3: "\n\n", 4: " sat", 5: "\t", 6: " on"}
    example = {"tokens": [0, 1, 2, 3, 4, 5, 6], "acts": [0, 3.0, 0, 0, 1.0, 0, 0], "focus": 1, "activation": 3.0}
    probe = (
        "<script>const c=document.querySelector('.ctx'),f=c.querySelector('.focus'),s=getComputedStyle(f);"
        "document.body.dataset.lines=Math.round(c.getBoundingClientRect().height/f.getBoundingClientRect().height);"
        "document.body.dataset.weight=s.fontWeight;document.body.dataset.line=s.textDecorationLine;</script>"
    )
    page = tmp_path / "context.html"
    page.write_text(_page("context", context_html(example, names, high=3.0) + probe))
    dom = _dump_dom(page, tmp_path / "profile")
    assert 'data-lines="1"' in dom, dom[-1500:]  # no line break tears the context apart
    assert 'data-weight="700"' in dom and 'data-line="underline"' in dom
    assert ">↵</span>" in dom and ">↵↵</span>" in dom and ">⇥</span>" in dom
    assert '<span class="focus" title="3 (the activating token)"' in dom and "> cat</span>" in dom


def test_no_dictionary(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    proc = run_cli("evaluate.py", f"run={tmp_path}", "analysis=features")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: no dictionary under"), proc.stderr[
        -2000:
    ]


def test_bfloat16_model_at_the_mlp_site(tiny_text):
    """float32 atoms through a bfloat16 model's down projection (``model.dtype=bfloat16``, ``hook.site=mlp``): the
    direct path matches the float32 model's, and a whole feature record is collected."""
    from sae.features.logit_effects import direct_logits

    hook = HookPoint(1, "mlp")
    model32, model16 = tiny_model(), tiny_model().to(torch.bfloat16)
    torch.manual_seed(0)
    dictionary = build("relu_tied", 64, 8, l1_coeff=0.0)
    atoms = dictionary.decoder_weight().detach()
    want = direct_logits(model32, hook, atoms)
    got = direct_logits(model16, hook, atoms)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())
    tokenizer = make_tokenizer(Path(tiny_text).parent / "tok16")
    docs = [json.loads(line)["text"] for line in Path(tiny_text).read_text().splitlines()]
    contexts = pack_contexts(docs[-4:], tokenizer, 32)
    with torch.no_grad():
        dictionary.b_enc.fill_(-0.01)  # most atoms fire somewhere on the tiny model's MLP neurons
    collector = Collector(LMSession.of_model(model16, [0]), dictionary, hook, contexts,
                          feature_settings(top_k=3, window=2, causal_contexts=2))
    assert len(collector.record(0)["direct"]["up"]) == 10
