"""The features study in bounded memory: the streaming top-k and token mass against brute force, and the
collection's peak memory at twice the tokens."""

import ctypes
import gc
import json
from pathlib import Path

import pytest
import torch
from conftest import feature_settings, make_tokenizer, tiny_model

from sae.dictionaries import build
from sae.features.monosemanticity import pair_scores, token_scores
from sae.features.records import Collector
from sae.features.streaming import RunningTopK, TokenMass
from sae.lm.hooks import HookPoint
from sae.lm.reader import capture as read_activations
from sae.lm.session import LMSession
from sae.lm.text import pack_contexts


def brute_top(codes: torch.Tensor, k: int) -> list[list[tuple[float, int]]]:
    """Per feature of ``codes`` ``[positions, features]``: its k largest positive codes as (value, position),
    largest first, ties to the earlier position."""
    out = []
    for f in range(codes.shape[1]):
        fired = [(v, i) for i, v in enumerate(codes[:, f].tolist()) if v > 0]
        out.append(sorted(fired, key=lambda e: (-e[0], e[1]))[:k])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_topk_equals_brute_force_with_ties(seed):
    """Codes drawn from a few values (most entries tie, many are 0), fed in batches of random sizes."""
    gen = torch.Generator().manual_seed(seed)
    positions, features, k = 600, 37, 7
    codes = torch.randint(0, 5, (positions, features), generator=gen).float() * (torch.rand(positions, features,
                                                                                              generator=gen) < 0.4)
    top = RunningTopK(features, k)
    start = 0
    while start < positions:
        size = int(torch.randint(1, 90, (1,), generator=gen))
        pos, feature = codes[start : start + size].nonzero(as_tuple=True)
        top.add(feature, codes[start + pos, feature], start + pos)
        start += size
    for f, want in enumerate(brute_top(codes, k)):
        key, value, index = top.of(f)
        assert list(zip(key.tolist(), index.tolist())) == want, f"feature {f}"
        assert value.tolist() == key.tolist()


def test_token_mass_equals_dense_sums():
    gen = torch.Generator().manual_seed(0)
    features, vocab = 11, 23
    mass, dense = TokenMass(features, min_flush=50), torch.zeros(vocab, features, dtype=torch.float64)
    for _ in range(20):
        feature, token = torch.randint(0, features, (30,), generator=gen), torch.randint(0, vocab, (30,), generator=gen)
        value = torch.rand(30, generator=gen)
        mass.add(feature, token, value)
        dense.index_put_((token, feature), value.double(), accumulate=True)
    feature, token, amount = mass.pairs()
    assert torch.equal(dense[token, feature], amount) and len(amount) == int((dense > 0).sum())
    sparse, full = pair_scores(feature, amount, features), token_scores(dense)
    for name in full:
        torch.testing.assert_close(sparse[name], full[name], equal_nan=True)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(run) -> int:
    """The resident memory ``run()`` adds at its peak (Linux: the high-water mark, reset first; torch's CPU
    allocations are invisible to ``tracemalloc``, so it cannot measure this)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _kib("VmRSS")
    run()
    return (_kib("VmHWM") - before) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_collection_memory_grows_with_features_not_tokens(tiny_text):
    """4,096 features on a 32-wide tiny model, each firing on 10% of the tokens (so every kept list fills): twice the
    held-out tokens, the same peak within 10%, where ``[tokens, features]`` codes would add 16 MiB."""
    model, hook, n_features = tiny_model(), HookPoint(1, "resid"), 4096
    tokenizer = make_tokenizer(Path(tiny_text).parent / "tok-memory")
    docs = [json.loads(line)["text"] for line in Path(tiny_text).read_text().splitlines()]
    contexts = pack_contexts(docs, tokenizer, 32)
    few = contexts.repeat(-(-32 // len(contexts)), 1)[:32]  # 32 contexts, 1,024 tokens
    torch.manual_seed(0)
    dictionary = build("relu_tied", 32, n_features, l1_coeff=0.0)
    with torch.no_grad():  # each feature's threshold at its 90th percentile on this text
        dictionary.b_enc.fill_(1e3)
        pre = dictionary.encode(read_activations(model, [hook], few)[hook].reshape(-1, 32)) - 1e3
        dictionary.b_enc.copy_(-pre.quantile(0.9, dim=0))
    session, settings = LMSession.of_model(model, [0]), feature_settings(causal_features=0)
    collect = lambda ids: lambda: Collector(session, dictionary, hook, ids, settings)  # noqa: E731
    collect(few)()  # warm-up: the allocator's and the libraries' first-use memory
    once, twice = peak_bytes(collect(few)), peak_bytes(collect(few.repeat(2, 1)))
    dense = 32 * 32 * n_features * 4  # what 1,024 more tokens of dense codes would add
    assert dense > 0.1 * once, f"the test cannot see a dense tensor: peak {once / 2**20:.1f} MiB"
    assert twice <= 1.1 * once, f"peak {once / 2**20:.1f} MiB at 1,024 tokens, {twice / 2**20:.1f} MiB at 2,048"
