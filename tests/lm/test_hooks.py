"""Hooked activations equal what the HF model computes, at every layer and site; the forward stops early."""

import pytest
import torch
from conftest import FIXTURES, needs_fixtures, tiny_model

from sae.errors import ConfigError
from sae.lm.hooks import SITES, HookPoint, intervene
from sae.lm.reader import capture as read_activations


def hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def check_resid(model, ids, final_norm):
    """Block i's output is hidden_states[i + 1]; the last entry has the final layer norm applied."""
    hs = hidden_states(model, ids)
    n = len(hs) - 1
    for layer in range(n):
        act = read_activations(model, [HookPoint(layer, "resid")], ids)[HookPoint(layer, "resid")]
        expected = hs[layer + 1]
        if layer == n - 1:
            with torch.no_grad():
                act = final_norm(act)
        torch.testing.assert_close(act, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama"])
def test_resid_matches_hidden_states(family):
    model = tiny_model(family)
    ids = torch.randint(0, 20, (2, 12))
    norm = {"gpt_neox": lambda m: m.gpt_neox.final_layer_norm, "gpt2": lambda m: m.transformer.ln_f,
            "llama": lambda m: m.model.norm}[family](model)
    check_resid(model, ids, norm)


@needs_fixtures
def test_resid_matches_hidden_states_real_model():
    from sae.lm.model import load_model

    model = load_model(str(FIXTURES / "neox-owt-14m"))
    ids = torch.randint(0, 50000, (2, 16))
    check_resid(model, ids, model.gpt_neox.final_layer_norm)


def test_neox_sites_compose_the_block():
    """For parallel-residual GPT-NeoX: resid_out = resid_in + attn_out + mlp_out, mlp_out = W_out(mlp),
    and mlp = act(W_in(LN(resid_in)))."""
    model = tiny_model("gpt_neox")
    ids = torch.randint(0, 20, (2, 10))
    hs = hidden_states(model, ids)
    for layer in range(2):  # the last block's hidden state has the final norm on it
        hooks = [HookPoint(layer, s) for s in SITES]
        acts = read_activations(model, hooks, ids)
        block = model.gpt_neox.layers[layer]
        resid_in = hs[layer]
        a = {h.site: acts[h] for h in hooks}
        torch.testing.assert_close(a["resid"], resid_in + a["attn_out"] + a["mlp_out"], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            expected_mlp = block.mlp.act(block.mlp.dense_h_to_4h(block.post_attention_layernorm(resid_in)))
            mlp_out = block.mlp.dense_4h_to_h(a["mlp"])
        torch.testing.assert_close(a["mlp_out"], mlp_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a["mlp"], expected_mlp, rtol=1e-5, atol=1e-5)
        assert a["mlp"].shape[-1] == model.config.intermediate_size


def test_forward_stops_after_deepest_hook():
    model = tiny_model("gpt_neox", layers=3)
    ran = []
    model.gpt_neox.layers[2].register_forward_hook(lambda *a: ran.append("block2"))
    model.get_output_embeddings().register_forward_hook(lambda *a: ran.append("unembed"))
    read_activations(model, [HookPoint(0, "mlp"), HookPoint(1, "resid")], torch.randint(0, 20, (1, 8)))
    assert ran == []


def test_intervene_replaces_activation():
    model = tiny_model("gpt_neox")
    ids = torch.randint(0, 20, (1, 8))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with intervene(model, HookPoint(1, "mlp"), lambda x: torch.zeros_like(x)):
            ablated = model(input_ids=ids).logits
        with intervene(model, HookPoint(1, "mlp"), lambda x: x.clone()):
            same = model(input_ids=ids).logits
    assert not torch.allclose(clean, ablated)
    torch.testing.assert_close(clean, same)


@pytest.mark.parametrize("hook,message", [(HookPoint(3, "resid"), "hook.layer=3 does not exist"),
                                          (HookPoint(0, "mlp_in"), "unknown hook.site")])
def test_bad_hook(hook, message):
    with pytest.raises(ConfigError, match=message):
        read_activations(tiny_model("gpt_neox"), [hook], torch.zeros(1, 4, dtype=torch.long))
