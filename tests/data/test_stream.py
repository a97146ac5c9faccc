"""The activation stream: mixing, sharding, and a state that restores the exact next batches; live activations skip
special positions."""

import torch
from conftest import tiny_model

from sae.data.stream import ActivationStream, ContextOrder
from sae.lm.hooks import HookPoint
from sae.lm.reader import read_rows

SEQ = 64


def _read_rows(indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stand-in for the LM: context c has SEQ rows whose value is their global position c * SEQ + i."""
    rows = (indices[:, None] * SEQ + torch.arange(SEQ)).flatten().float().unsqueeze(1)
    return {"ctx": rows}


def _stream(n_contexts: int = 200, rank: int = 0, world: int = 1, seed: int = 0) -> ActivationStream:
    return ActivationStream(_read_rows, ContextOrder(n_contexts, seed, rank, world), 4, 2048, 64, seed)


def _take(stream, n: int) -> list[torch.Tensor]:
    it = iter(stream)
    return [next(it)["ctx"] for _ in range(n)]


def test_shuffle_mixes_contexts_and_emits_each_row_once_per_epoch():
    batches = _take(_stream(), 150)  # 150 * 64 rows of 200 * 64: under one epoch
    rows = torch.cat(batches).flatten().long()
    assert len(rows) == len(set(rows.tolist()))
    for b in batches:
        assert len((b.flatten().long() // SEQ).unique()) > 20  # a batch of 64 draws from many contexts


def test_context_order_covers_every_context_each_epoch_and_shards_by_rank():
    order = ContextOrder(10, seed=0)
    first, second = torch.cat([order.take(3) for _ in range(4)]), torch.cat([order.take(3) for _ in range(4)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10)) and not torch.equal(first, second)
    shards = [ContextOrder(10, 0, rank, 3).take(10) for rank in range(3)]  # each rank's share of epoch 0
    assert sorted(torch.cat(shards).tolist()) == list(range(10))


def test_stream_state_restores_the_next_batches_exactly():
    """Save after n batches (mid-fill, at a fill's end and past an epoch's end), restore into a new stream: the
    batches that follow are the same."""
    reference = _take(_stream(n_contexts=40), 200)  # 40 contexts: a new epoch every 40 batches
    for n in (5, 32, 33, 64, 117):
        stream = _stream(n_contexts=40)
        _take(stream, n)
        state = stream.state_dict()
        resumed = _stream(n_contexts=40, seed=0)
        resumed.load_state_dict(state)
        for got, want in zip(_take(resumed, 40), reference[n : n + 40]):
            assert torch.equal(got, want)


def test_live_activations_skip_special_positions():
    model = tiny_model()
    ids = torch.randint(2, 20, (2, 8))
    ids[:, 0] = 0
    ids[1, 4] = 0
    batch = read_rows(model, [HookPoint(1, "resid"), HookPoint(0, "mlp")], ids, [0])
    assert batch["layers.1.resid"].shape == (13, 32) and batch["layers.0.mlp"].shape == (13, 64)
