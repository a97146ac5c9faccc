"""Fused sets: dictionaries of one shape train as one stacked group, to the weights each gets alone."""

import pytest
import torch
from safetensors.torch import load_file

import sae.training.fusing as fusing
from conftest import compose_config, tiny_overrides
from sae.dictionaries import build
from sae.training.objectives import reconstruction_loss, terms_loss
from sae.training.run import RunInfo, train
from test_dictionary_set import EXTRA, _alone_overrides, _set_override

RELU = {"l1_coeff": 0.04}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
TOPK = {"k": 8, "aux_coeff": 1 / 32, "k_aux": 16}


def test_groups_by_variant_width_size_and_fuse_key():
    dictionaries = [build("relu_tied", 16, 64, l1_coeff=0.04), build("topk", 16, 64, **TOPK),
                    build("relu_tied", 16, 64, l1_coeff=0.08),  # l1_coeff may differ
                    build("relu_tied", 16, 32, **RELU), build("relu", 16, 64, **RELU),  # another size, another variant
                    build("topk", 16, 64, **{**TOPK, "aux_coeff": 0.1}), build("topk", 16, 64, **{**TOPK, "k": 4}),
                    build("batchtopk", 16, 64, **TOPK, threshold_lr=0.01), build("batchtopk", 16, 64, **TOPK, threshold_lr=0.01)]
    assert fusing.fusion_groups(dictionaries) == [[0, 2], [1, 5], [3], [4], [6], [7], [8]]
    assert fusing.fusion_groups(dictionaries, fuse=False) == [[i] for i in range(len(dictionaries))]


@pytest.mark.parametrize("variant,settings", [
    ("relu_tied", [{"l1_coeff": 0.04}, {"l1_coeff": 0.1}, {"l1_coeff": 0.02}]),
    ("relu", [{"l1_coeff": 0.04}, {"l1_coeff": 0.1}]),
    ("topk", [TOPK, {**TOPK, "aux_coeff": 0.5}, TOPK]),
])
def test_stacked_step_gives_each_member_its_own_loss_and_gradients(variant, settings, one_thread):
    """Bitwise, in one thread (with several, a batched product may split its sums otherwise than a single one)."""
    torch.manual_seed(0)
    dictionaries = [build(variant, 16, 64, **s) for s in settings]
    x, dead = torch.randn(len(settings), 96, 16), torch.rand(len(settings), 64) > 0.5
    alone = []
    for g, d in enumerate(dictionaries):
        loss, _ = reconstruction_loss(d, x[g], dead[g], 0.5)
        alone.append((loss.detach(), torch.autograd.grad(loss, list(d.parameters()))))
    losses, _ = terms_loss(type(dictionaries[0]).stacked_train_terms(dictionaries, x, dead), x, 0.5)
    grads = torch.autograd.grad(losses.sum(), [p for d in dictionaries for p in d.parameters()])
    for g, d in enumerate(dictionaries):
        assert torch.equal(losses[g], alone[g][0])
        mine = grads[g * len(alone[g][1]):(g + 1) * len(alone[g][1])]
        for (name, _), want, got in zip(d.named_parameters(), alone[g][1], mine):
            assert torch.equal(got, want), f"member {g}: {name}"


# two groups of two (different hooks and scalar hyperparameters) and one member alone; every one resamples
FUSED_SET = [
    {"name": "r0", "hook": {"layer": 0}},
    {"name": "r2", "hook": {"layer": 2}, "sae": {"l1_coeff": 0.08}},
    {"name": "t0", "hook": {"layer": 0}, "sae": {"variant": "topk", "k": 8}},
    {"name": "t1", "hook": {"layer": 1}, "sae": {"variant": "topk", "k": 8, "aux_coeff": 0.1}},
]


@pytest.mark.usefixtures("hydra_app")
def test_fused_set_trains_each_dictionary_as_if_alone(tiny_lm_dir, tiny_text, tmp_path, monkeypatch):
    fused_groups = []
    group_losses = fusing.group_losses

    def spy(members, batch, weight):
        fused_groups.append(tuple(member.name for member in members))
        return group_losses(members, batch, weight)

    monkeypatch.setattr(fusing, "group_losses", spy)
    base = tiny_overrides(tiny_lm_dir, tiny_text, tmp_path, *EXTRA)
    together = train(compose_config([*base, "train.fuse=true", _set_override(FUSED_SET)]), RunInfo(tmp_path / "set", "set", None))
    assert set(fused_groups) == {("r0", "r2"), ("t0", "t1")}  # fusing happened, in these groups only
    fused_groups.clear()
    for entry in FUSED_SET:
        alone_dir = tmp_path / f"alone_{entry['name']}"
        alone = train(compose_config([*base, *_alone_overrides(entry)]), RunInfo(alone_dir, entry["name"], None))
        weights, weights_alone = (load_file(str(d / "sae.safetensors")) for d in (tmp_path / "set" / entry["name"], alone_dir))
        assert weights.keys() == weights_alone.keys()
        for key in weights:
            torch.testing.assert_close(weights[key], weights_alone[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{entry['name']}.{key}: {m}")
        assert together[entry["name"]]["fvu"] == pytest.approx(alone["fvu"], rel=1e-4)
    assert not fused_groups  # a run of one dictionary has nothing to fuse
