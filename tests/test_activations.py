"""The shuffle buffer mixes contexts and loses nothing; the live stream skips special positions."""

import torch

from conftest import tiny_model
from sae.activations import context_batches, live_activations, shuffled_batches
from sae.hooks import HookPoint


def test_shuffle_mixes_contexts_and_emits_each_row_once():
    seq = 64
    chunks = [{"ctx": torch.arange(c * seq, (c + 1) * seq).float().unsqueeze(1)} for c in range(200)]
    batches = list(shuffled_batches(iter(chunks), buffer_size=2048, batch_size=64, generator=torch.Generator().manual_seed(0)))
    rows = torch.cat([b["ctx"] for b in batches]).flatten().long()
    assert len(rows) == len(set(rows.tolist())) > 0.8 * 200 * seq
    for b in batches:
        contexts = (b["ctx"].flatten().long() // seq).unique()
        assert len(contexts) > 20  # a batch of 64 draws from many contexts, not a run of one


def test_context_batches_cover_every_context_each_epoch():
    contexts = torch.arange(10).unsqueeze(1)
    out = torch.cat(list(context_batches(contexts, 3, torch.Generator().manual_seed(0), epochs=2))).flatten()
    assert sorted(out.tolist()) == sorted(list(range(10)) * 2)


def test_live_activations_skip_special_positions():
    model = tiny_model()
    ids = torch.randint(2, 20, (2, 8))
    ids[:, 0] = 0
    ids[1, 4] = 0
    batch = next(live_activations(model, [HookPoint(1, "resid"), HookPoint(0, "mlp")], iter([ids]), [0], torch.device("cpu")))
    assert batch["layers.1.resid"].shape == (13, 32) and batch["layers.0.mlp"].shape == (13, 64)
