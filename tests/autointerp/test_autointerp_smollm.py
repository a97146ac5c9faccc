"""A real instruct LLM (SmolLM2-135M-Instruct, GGUF fixture) explains and simulates two features planted on real
text with the real Pythia tokenizer. A 135M model is a very weak judge: this checks the plumbing, not quality."""

import json
import math

import pytest
import torch
from conftest import FIXTURES

SMOL = FIXTURES / "smollm2-135m-instruct"
pytestmark = [pytest.mark.fixtures, pytest.mark.skipif(not SMOL.is_dir(), reason=f"{SMOL} is absent")]


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf", reason="the GGUF fixture needs the `gguf` package: pip install -e '.[autointerp]'")
    from sae.autointerp.backends.hf_local import HFLocalBackend

    return HFLocalBackend.load(str(SMOL), batch_size=4)  # a directory holding exactly one .gguf: that file


def test_smollm2_explains_and_simulates_two_planted_features(smol, tmp_path):
    from transformers import AutoTokenizer

    from sae.autointerp import RecordConfig, StudyConfig, decoder_from_tokenizer, iter_feature_activations, run_study
    from sae.autointerp.interpret import LLMInterpreter

    tok = AutoTokenizer.from_pretrained(FIXTURES / "pythia-tokenizer")
    docs = [json.loads(line)["text"] for line in open(FIXTURES / "text" / "openwebtext-1k.jsonl")][900:915]
    ids = torch.tensor([i for enc in tok(docs).input_ids for i in enc][: 16 * 48]).reshape(48, 16)
    codes = torch.zeros(48, 16, 2)
    codes[..., 0] = (ids == tok(" the").input_ids[0]).float() * 2  # fires on " the"
    codes[..., 1] = (ids == tok(",").input_ids[0]).float()  # fires on commas
    cfg = StudyConfig(records=RecordConfig(fragment_len=16, n_explain=2, n_score_top=1,
                                           n_score_random=1, n_quantiles=1, per_quantile=1),
                      scorers=("simulation", "detection"), controls=False, n_bootstrap=20)
    res = run_study(iter_feature_activations("dictionary", "blocks.3.hook_resid_post", 3, codes, ids, [0, 1], 16),
                    LLMInterpreter(smol, explain_max_tokens=16), decoder_from_tokenizer(tok), tmp_path, cfg)
    assert res.meta["explainer"]["model"] == "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert res.meta["explainer"]["params"] == "135M"  # the plot title names it: a 135M stand-in judge
    assert len(res.rows) == 2
    for row in res.rows:
        sims = row["_detail"]["explainer"].get("simulated")
        if row["explanation_parsed"]:
            assert isinstance(row["explanation"], str) and row["explanation"]
            flat = [v for frag in sims["top"] + sims["random"] for v in frag]
            assert len(flat) == 32 and all(0 <= v <= 10 for v in flat)  # an expected value over "0".."10" per token
            assert math.isfinite(row["simulation"]) or len(set(flat)) == 1
        assert row["_detail"]["explainer"]["explanation"]["raw"]
    assert (tmp_path / "plots" / "autointerp_by_layer.png").is_file()
