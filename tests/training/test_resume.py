"""Exact resume: the data streams' state round-trips, a run killed with SIGKILL resumes to the same dictionary, and
the run directory and a corrupted checkpoint are checked before any work."""

import json
import os
import shutil
import zipfile

import pytest
import torch
from conftest import compose_config, kill_after_checkpoint, make_lm_datamodule, run_cli, tiny_overrides, toy_data
from safetensors.torch import load_file

from sae.data.datamodule import ActivationDataModule
from sae.data.toy import ToyDataModule
from sae.errors import ConfigError
from sae.io.checkpoints import (
    LAST,
    AtomicCheckpointIO,
    check_resumed_settings,
    record_settings,
    resume_checkpoint,
    write_status,
)
from sae.lm.hooks import HookPoint


def consume(dm, n: int) -> list[dict]:
    """``n`` batches as Lightning trains on them: fetched one ahead, each handed over just before its step."""
    it = iter(dm.train_dataloader())
    batches, ahead = [], next(it)
    for _ in range(n):
        batch, ahead = ahead, next(it)
        batches.append(dm.on_before_batch_transfer(batch, 0))
    return batches


def lm_datamodule(lm_dir, text, streaming: bool = False) -> ActivationDataModule:
    return make_lm_datamodule(
        lm_dir,
        text,
        [HookPoint(1, "resid")],
        lm_batch_size=4,
        buffer_size=512,
        batch_size=64,
        seed=3,
        streaming=streaming,
    )


def toy_datamodule() -> ToyDataModule:
    return ToyDataModule(toy_data(n_features=32, d=16, avg_active=3, seed=1), batch_size=32, chunk=4)


@pytest.mark.parametrize("kind", ["lm", "lm_streaming", "toy"])
def test_stream_state_round_trips(kind, tiny_lm_dir, tiny_text):
    lm = lambda: lm_datamodule(tiny_lm_dir, tiny_text, streaming=kind == "lm_streaming")  # noqa: E731
    make = toy_datamodule if kind == "toy" else lm
    reference = consume(make(), 30)
    for n in (3, 8, 13):  # the LM's buffer makes 8 batches per fill, the toy's chunk 4
        dm = make()
        consume(dm, n)
        state = dm.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        for got, want in zip(consume(resumed, 10), reference[n : n + 10]):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_toy_processes_share_each_global_batch():
    whole = consume(toy_datamodule(), 6)
    parts = []
    for rank in range(2):
        dm = toy_datamodule()
        dm.rank, dm.world_size = rank, 2
        parts.append(consume(dm, 6))
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i]["toy"], parts[1][i]["toy"]]), batch["toy"])


def resume_overrides(lm_dir, text, run_dir) -> list[str]:
    """A run long enough to kill mid-way (80 steps), resampling atoms every 5 steps (similar ones count as
    duplicates), so the resampling RNG's state matters too."""
    return tiny_overrides(lm_dir, text, run_dir, "train.tokens=10240", "trainer.checkpoint_every_n_steps=7", "sae=relu",
                          "train.resample_every=5", "train.duplicate_cos=0.5")


def test_killed_run_resumes_to_the_same_dictionary(tiny_lm_dir, tiny_text, tmp_path):
    whole = run_cli("train.py", *resume_overrides(tiny_lm_dir, tiny_text, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_after_checkpoint(resume_overrides(tiny_lm_dir, tiny_text, killed), killed)
    assert not (killed / "sae.safetensors").exists()
    assert json.loads((killed / "status.json").read_text())["state"] == "running"
    corrupted = tmp_path / "corrupted"
    shutil.copytree(killed, corrupted)
    _flip_tensor_byte(corrupted / LAST)
    refused = run_cli("train.py", *resume_overrides(tiny_lm_dir, tiny_text, corrupted), "resume=true")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert lines[0].startswith(f"error: checkpoint {corrupted / LAST} is corrupted: delete")
    changed = run_cli("train.py", *resume_overrides(tiny_lm_dir, tiny_text, killed), "resume=true", "train.lr=0.5",
                      "stream.buffer_size=512", "data.eval_tokens=256")  # the last one may change
    lines = changed.stderr.strip().splitlines()
    assert changed.returncode == 2 and len(lines) == 1, changed.stderr[-2000:]
    assert lines[0].startswith("error: resume=true with changed training settings: stream.buffer_size=512 (was 1024), "
                               "train.lr=0.5 (was 0.003); resume with the run's own settings"), lines[0]
    # how often it logs and checkpoints may change: the result is still the uninterrupted run's, bit for bit
    resumed = run_cli("train.py", *resume_overrides(tiny_lm_dir, tiny_text, killed), "resume=true",
                      "trainer.log_every_n_steps=3", "trainer.checkpoint_every_n_steps=9")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = load_file(str(tmp_path / "whole" / "sae.safetensors")), load_file(str(killed / "sae.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)  # the README: "identical"
    status = json.loads((killed / "status.json").read_text())
    assert status["state"] == "finished" and {"setup", "train_loop", "heldout_eval"} <= status["seconds"].keys()


def test_run_directory_and_resume_must_agree(tmp_path):
    assert resume_checkpoint(tmp_path, resume=False) is None
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        resume_checkpoint(tmp_path, resume=True)
    write_status(tmp_path, "running")
    with pytest.raises(ConfigError, match=r"already holds a run \(status: running\): add resume=true"):
        resume_checkpoint(tmp_path, resume=False)
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / LAST)
    assert resume_checkpoint(tmp_path, resume=True) == tmp_path / LAST
    write_status(tmp_path, "finished")
    with pytest.raises(ConfigError, match="is already finished"):
        resume_checkpoint(tmp_path, resume=True)


def test_resume_refuses_changed_training_settings_only(tmp_path):
    from sae.training.validation import training_settings

    def settings(*extra: str) -> dict:
        return training_settings(
            compose_config(tiny_overrides(tmp_path / "lm", tmp_path / "t.jsonl", tmp_path, *extra))
        )

    record_settings(tmp_path, settings())
    check_resumed_settings(tmp_path, settings("resume=true", "logger=wandb", "trainer.log_every_n_steps=1",
                                              "trainer.checkpoint_every_n_steps=3", "data.eval_tokens=64"))
    with pytest.raises(ConfigError, match=r"changed training settings: sae.aux_coeff=.*, sae.k=32 \(was <unset>\), .*"
                                          r"sae.variant=topk \(was relu_tied\); resume with"):
        check_resumed_settings(tmp_path, settings("sae=topk"))
    for changed in ("seed=1", "trainer.precision=bf16-mixed", "stream.lm_batch_size=4", "data.context_length=16"):
        with pytest.raises(ConfigError, match=f"changed training settings: {changed.split('=')[0]}="):
            check_resumed_settings(tmp_path, settings(changed))


def _flip_tensor_byte(path) -> None:
    """Flip one byte inside the largest tensor record of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("corrupt", [_flip_tensor_byte, _truncate], ids=["byte_flip", "truncated"])
def test_corrupted_checkpoint_is_refused(corrupt, tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.randn(1000), "step": 3}, path)
    assert AtomicCheckpointIO().load_checkpoint(path)["step"] == 3
    corrupt(path)
    with pytest.raises(ConfigError, match=f"checkpoint {path} is corrupted: delete"):
        AtomicCheckpointIO().load_checkpoint(path)
