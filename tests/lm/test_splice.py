"""The spliced forward: edits at a hook, gradients through the frozen model, and the patching identities."""

import pytest
import torch
from conftest import TEST_HPARAMS, tiny_model

from sae.dictionaries import build
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture, token_mask
from sae.lm.splice import Ablate, AddDelta, PatchCodes, Reconstruct, Replace, atoms_in_model_units, spliced_forward

HOOK = HookPoint(1, "resid")
SPECIAL = [0]


def _setup(dtype=torch.float32, variant="relu"):
    model = tiny_model().to(dtype).requires_grad_(False)  # as load_model leaves it
    torch.manual_seed(1)
    ids = torch.randint(2, 20, (3, 10))
    ids[:, 0] = 0  # BOS
    ids[2, 6] = 0  # a document boundary inside a context
    d = build(variant, 32, 64, **{**TEST_HPARAMS[variant], **({"k": 8} if variant == "topk" else {})}).to(dtype)
    d.init_from_data(capture(model, [HOOK], ids)[HOOK].flatten(0, 1).to(dtype))
    with torch.no_grad():  # a trained-looking encoder: some codes fire, some do not
        d.b_enc.add_(0.1 * torch.randn_like(d.b_enc))
    return model, ids, d


def test_patching_no_feature_leaves_the_logits_bit_equal():
    model, ids, d = _setup()
    with torch.no_grad():
        clean = spliced_forward(model, ids, {}, SPECIAL).logits
        other = d.encode(capture(model, [HOOK], ids.flip(0))[HOOK])
        patched = spliced_forward(model, ids, {HOOK: PatchCodes(d, [], other)}, SPECIAL).logits
        none_mask = spliced_forward(
            model, ids, {HOOK: PatchCodes(d, torch.zeros(64, dtype=torch.bool), other)}, SPECIAL
        ).logits
    assert torch.equal(patched, clean) and torch.equal(none_mask, clean)


@pytest.mark.parametrize("variant", ["relu", "topk"])
def test_patching_every_feature_gives_the_other_reconstruction_plus_this_error(variant):
    model, ids, d = _setup(variant=variant)
    with torch.no_grad():
        x, x_other = capture(model, [HOOK], ids)[HOOK], capture(model, [HOOK], ids.flip(0))[HOOK]
        keep = token_mask(ids, SPECIAL)
        edit = PatchCodes(d, torch.arange(64), d.encode(x_other))
        got = edit(x, keep)
        want = d.decode(d.encode(x_other)) + (x - d.decode(d.encode(x)))
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[~keep], x[~keep])  # special positions keep the model's own activation
        spliced = spliced_forward(model, ids, {HOOK: edit}, SPECIAL).logits
        replaced = spliced_forward(model, ids, {HOOK: Replace(torch.where(keep[..., None], want, x))}, SPECIAL).logits
    torch.testing.assert_close(spliced, replaced, rtol=1e-4, atol=1e-4)


def test_ablating_one_feature_moves_x_only_along_its_atom():
    model, ids, d = _setup()
    with torch.no_grad():
        x = capture(model, [HOOK], ids)[HOOK]
        keep = token_mask(ids, SPECIAL)
        codes = d.encode(x)
        j = int(codes[keep].gt(0).sum(0).argmax())  # a feature that fires
        change = Ablate(d, [j])(x, keep) - x
    atom = atoms_in_model_units(d)[j]
    along = change @ atom / atom.dot(atom)
    torch.testing.assert_close(change, along[..., None] * atom, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(along[keep], -codes[keep][:, j], rtol=1e-4, atol=1e-5)
    assert along[keep].abs().max() > 0


def test_gradient_through_the_splice_matches_a_finite_difference():
    """With autograd on, a dictionary's parameters get the gradient of a loss on the spliced logits (the frozen LM
    gets none), and it equals a central finite difference."""
    model, ids, d = _setup(torch.float64)
    target = torch.randn(3, 10, model.config.vocab_size, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (spliced_forward(model, ids, {HOOK: Reconstruct(d)}, SPECIAL).logits * target).sum()

    loss().backward()
    assert all(p.grad is None for p in model.parameters())
    for name, index in (("W_enc", (5, 3)), ("W_dec", (7, 2)), ("b_enc", (11,)), ("b_dec", (4,))):
        param = getattr(d, name)
        eps = 1e-6
        with torch.no_grad():
            param[index] += eps
            up = loss().item()
            param[index] -= 2 * eps
            down = loss().item()
            param[index] += eps
        assert param.grad[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-7), name


def test_reads_the_arriving_activation_and_unembeds_chosen_positions():
    model, ids, d = _setup()
    later = HookPoint(2, "resid")
    with torch.no_grad():
        clean = spliced_forward(model, ids, {}, SPECIAL, read=[HOOK, later])
        zeroed = spliced_forward(model, ids, {HOOK: Replace(torch.zeros(()))}, SPECIAL, read=[HOOK, later])
        at = (torch.tensor([0, 2]), torch.tensor([4, 9]))
        some = spliced_forward(model, ids, {HOOK: AddDelta(torch.ones(32))}, SPECIAL, at=at).logits
        full = spliced_forward(model, ids, {HOOK: AddDelta(torch.ones(32))}, SPECIAL).logits
    assert torch.equal(clean.activations[HOOK], capture(model, [HOOK], ids)[HOOK])
    assert torch.equal(zeroed.activations[HOOK], clean.activations[HOOK])  # before its own edit
    assert not torch.allclose(zeroed.activations[later], clean.activations[later])  # after the upstream edit
    torch.testing.assert_close(some, full[at], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama"])
@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_a_forward_started_from_the_clean_prefix_equals_the_whole_forward(family, site):
    """The held-out metrics' spliced and ablated runs start at the hook's block from the clean run's residual
    stream entering it (``Prefix``): the same final hidden states as the whole spliced forward, and the blocks
    below do not run."""
    from sae.lm.splice import Prefix, can_start_at_block

    model = tiny_model(family).requires_grad_(False)
    hook = HookPoint(1, site)
    ids = torch.randint(2, 20, (3, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    with torch.no_grad():
        clean = spliced_forward(model, ids, {}, SPECIAL, read=[hook], hidden=True, keep_prefix=hook.layer)
        edit = {hook: AddDelta(0.5 * torch.ones(clean.activations[hook].shape[-1]))}
        whole = spliced_forward(model, ids, edit, SPECIAL, hidden=True).hidden
        calls = []
        first = model.get_submodule({"gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h",
                                     "llama": "model.layers"}[family])[0]
        handle = first.register_forward_hook(lambda *_: calls.append(1))
        started = spliced_forward(model, ids, edit, SPECIAL, hidden=True, prefix=clean.prefix).hidden
        handle.remove()
        with pytest.raises(ValueError, match="below"):
            spliced_forward(model, ids, {HookPoint(0): edit[hook]}, SPECIAL, prefix=clean.prefix)
    assert can_start_at_block(model, 1) and isinstance(clean.prefix, Prefix) and clean.prefix.layer == 1
    assert calls == [] and not torch.allclose(whole, clean.hidden)
    torch.testing.assert_close(started, whole, rtol=1e-6, atol=1e-6)
