"""The activation cache: a hit gives the live activations, keys cannot go stale, half-written caches are never read."""

import json
import shutil

import pytest
import torch
from conftest import compose_config, make_lm_datamodule, text_settings, tiny_overrides
from safetensors.torch import load_file

import sae.data.cache
from sae.data.cache import CacheSettings, cache_key, key_material, model_fingerprint, open_cache, prepare_caches
from sae.data.datamodule import ActivationDataModule
from sae.lm.hooks import HookPoint
from sae.lm.session import LMSession

HOOKS = [HookPoint(0, "resid"), HookPoint(1, "mlp")]


def datamodule(
    lm_dir, text, cache_dir=None, cache_dtype="float16", hooks=HOOKS, context_length=32
) -> ActivationDataModule:
    return make_lm_datamodule(lm_dir, text, hooks, context_length, cache_dir=cache_dir, cache_dtype=cache_dtype)


def index_batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(5))[:4]


class CountingForward:
    """Counts the LM's forward calls."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cache_hit_gives_the_live_activations(tiny_lm_dir, tiny_text, tmp_path, dtype):
    live = datamodule(tiny_lm_dir, tiny_text)
    datamodule(tiny_lm_dir, tiny_text, tmp_path, dtype)  # writes the caches
    hit = datamodule(tiny_lm_dir, tiny_text, tmp_path, dtype)
    forwards = CountingForward(hit.session.model)
    for indices in index_batches(len(live.session.train_contexts)):
        expected, cached = live.read(indices), hit.read(indices)
        for hook in HOOKS:
            want = expected[hook.name]
            if dtype == "float32":
                assert torch.equal(cached[hook.name], want)
            else:
                assert torch.equal(cached[hook.name], want.to(getattr(torch, dtype)).float())
    assert forwards.calls == 0  # every hook came from disk
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == sorted(h.name for h in HOOKS)


def test_a_cache_is_never_read_for_another_hook(tiny_lm_dir, tiny_text, tmp_path):
    datamodule(tiny_lm_dir, tiny_text, tmp_path, "float32", hooks=[HOOKS[0]])
    live = datamodule(tiny_lm_dir, tiny_text, hooks=[HookPoint(1, "resid")])
    mixed = datamodule(tiny_lm_dir, tiny_text, tmp_path, "float32", hooks=[HOOKS[0], HookPoint(1, "resid")])
    indices = index_batches(len(live.session.train_contexts))[0]
    assert torch.equal(mixed.read(indices)["layers.1.resid"], live.read(indices)["layers.1.resid"])
    assert len(list(tmp_path.iterdir())) == 2  # one directory per hook


def _settings(tmp_path, lm_dir, dtype="float16") -> CacheSettings:
    return CacheSettings(tmp_path / "cache", dtype, str(lm_dir), "float32", {"context_length": 32})


def test_a_half_written_cache_is_never_read(tiny_lm_dir, tiny_text, tmp_path, monkeypatch):
    dm = datamodule(tiny_lm_dir, tiny_text)
    settings = _settings(tmp_path, tiny_lm_dir)
    calls = {"n": 0}
    real = sae.data.cache.read_batches

    def dies_midway(*args, **kwargs):
        for batch in real(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # a kill while writing
            yield batch

    monkeypatch.setattr(sae.data.cache, "read_batches", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_caches(settings, HOOKS, dm.session.model, dm.session.train_contexts, 8)
    monkeypatch.setattr(sae.data.cache, "read_batches", real)
    material = key_material(settings, HOOKS[0], dm.session.train_contexts, model_fingerprint(str(tiny_lm_dir)))
    assert open_cache(settings.root, HOOKS[0], cache_key(material)) is None
    caches = prepare_caches(settings, HOOKS, dm.session.model, dm.session.train_contexts, 8)
    directory = caches[HOOKS[0]].directory
    (directory / "meta.json").unlink()  # a directory without meta.json: not finished
    assert open_cache(settings.root, HOOKS[0], cache_key(material)) is None
    rebuilt = prepare_caches(settings, HOOKS, dm.session.model, dm.session.train_contexts, 8)
    assert rebuilt[HOOKS[0]].directory == directory and (directory / "meta.json").is_file()


def test_the_key_changes_with_model_files_data_context_length_and_hook(tiny_lm_dir, tiny_text, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model_dir)
    other_text = tmp_path / "other.jsonl"
    lines = tiny_text.read_text().splitlines()
    other_text.write_text(
        "\n".join([json.dumps({"text": "the cat sat on the mat"})] + lines[1:]) + "\n"
    )  # one training document

    def key(text=tiny_text, context_length=32, hook=HOOKS[0]):
        session = LMSession(
            str(model_dir), text_settings(text, context_length), model_dtype="float32", lm_batch_size=8, seed=0
        )
        settings = CacheSettings(tmp_path, "float16", str(model_dir), "float32", {"context_length": context_length})
        return cache_key(key_material(settings, hook, session.train_contexts, model_fingerprint(str(model_dir))))

    base = key()
    assert key() == base
    changed = {"data file": key(text=other_text), "context_length": key(context_length=16), "hook": key(hook=HOOKS[1])}
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    next(iter(tensors.values())).add_(1.0)
    from safetensors.torch import save_file

    save_file(tensors, str(weights), metadata={"format": "pt"})
    changed["model weights"] = key()
    assert all(k != base for k in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_training_from_the_cache_gives_the_same_dictionary(tiny_lm_dir, tiny_text, tmp_path):
    """Float32 cache: a run that writes it and a run that reads it train exactly what a live run trains."""
    from sae.training.run import RunInfo, train

    base = tiny_overrides(tiny_lm_dir, tiny_text, tmp_path)
    cached = [*base, f"stream.cache_dir={tmp_path / 'cache'}", "stream.cache_dtype=float32"]
    for name, overrides in (("live", base), ("writes", cached), ("reads", cached)):
        train(compose_config(overrides), RunInfo(tmp_path / name, name, None))
    live = load_file(str(tmp_path / "live" / "sae.safetensors"))
    for name in ("writes", "reads"):
        for k, v in load_file(str(tmp_path / name / "sae.safetensors")).items():
            assert torch.equal(v, live[k]), (name, k)


def test_a_short_run_stores_only_the_contexts_it_reads_in_shards(tiny_lm_dir, tiny_text, tmp_path, monkeypatch):
    """train.tokens far below one epoch: the cache holds the planned contexts only (several shard files), and the
    stream and the initialising sample then read every batch from it, never the LM."""
    from sae.data.datamodule import LOOKAHEAD, ReadPlan

    monkeypatch.setattr(sae.data.cache, "SHARD_BYTES", 4 * 32 * 32 * 2)  # four float16 contexts of width 32 a shard
    plan = ReadPlan(steps=3, init_tokens=100)
    dm = make_lm_datamodule(tiny_lm_dir, tiny_text, [HOOKS[0]], cache_dir=tmp_path, plan=plan, buffer_size=128)
    cache = dm.caches[HOOKS[0]]
    n_all = len(dm.session.train_contexts)
    assert 0 < len(cache.stored) < n_all // 2 and list(cache.stored) == sorted(set(cache.stored.tolist()))
    assert len(cache.meta["shards"]) == -(-len(cache.stored) // 4) > 1
    live = datamodule(tiny_lm_dir, tiny_text, hooks=[HOOKS[0]])
    picks = torch.from_numpy(cache.stored[::-3].copy())  # out of order, across shards
    want = live.read(picks)[HOOKS[0].name].to(torch.float16).float()
    assert torch.equal(dm.read(picks)[HOOKS[0].name], want)
    forwards = CountingForward(dm.session.model)
    for _ in zip(range(plan.steps + LOOKAHEAD), dm.make_stream()):
        pass
    dm.sample(plan.init_tokens)
    assert forwards.calls == 0  # everything the run reads was planned
    outside = torch.tensor(sorted(set(range(n_all)) - set(cache.stored.tolist()))[:3])
    assert not cache.holds(outside) and torch.equal(dm.read(outside)[HOOKS[0].name], live.read(outside)[HOOKS[0].name])
    assert forwards.calls > 0  # outside the plan: read live, correctly
