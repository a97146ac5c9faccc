"""Shared test fixtures: a tiny GPT-NeoX and tokenizer built in the test, text, and the real ../shared fixtures."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # `pytest -n 2` (the README's command): two workers on two cores, so each worker and every process it starts
    # keeps to one thread (two 2-thread torch processes on 2 cores thrash).
    os.environ["OMP_NUM_THREADS"] = "1"

# The tests' token stores and datasets files go to a directory of this test process (its subprocesses inherit
# it), never into the user's Hugging Face datasets cache; removed when the process exits.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="sae-tests-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
atexit.register(shutil.rmtree, _DATASETS_CACHE, ignore_errors=True)

import torch  # noqa: E402  (after the thread setting, which torch reads when it loads)

import sae.autointerp.config  # noqa: E402, F401  (the autointerp and explainer schemas)
import sae.circuits.config  # noqa: E402, F401  (importing registers the patching, circuits and task schemas)
import sae.evaluation.config  # noqa: E402, F401  (importing registers evaluate.yaml's, metrics' and residue's schemas)
import sae.features.config  # noqa: E402, F401  (the features schema)
import sae.probing.config  # noqa: E402, F401  (the probing schema)
import sae.training.config  # noqa: E402, F401  (importing registers the training config's schemas)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"{FIXTURES} is absent: the real tokenizer, text and neox-owt-14m are needed"
)


def needs_cuda(test):
    """Mark a test ``cuda`` (``pytest -m cuda`` selects them) and skip it, saying why, without a CUDA device."""
    reason = "no CUDA device on this machine: the GPU test runs only where torch.cuda.is_available()"
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=reason)(test))


def needs_gpus(n: int):
    """Like ``needs_cuda``, for a test that needs ``n`` CUDA devices (multi-GPU DDP)."""
    def mark(test):
        reason = f"fewer than {n} CUDA devices here ({torch.cuda.device_count()}): the multi-GPU test needs {n}"
        return pytest.mark.cuda(pytest.mark.skipif(torch.cuda.device_count() < n, reason=reason)(test))
    return mark


WORDS = "the a cat dog sat ran on under mat log big small red blue and then it was very quick slow".split()


def make_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="[UNK]"
    )
    fast.save_pretrained(directory)
    return fast


def tiny_config(family: str = "gpt_neox", layers: int = 3, vocab: int = len(WORDS) + 2):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
    )


def tiny_model(family: str = "gpt_neox", layers: int = 3, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, layers)).eval()


def random_text(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(n_docs)]


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A randomly initialised 3-block GPT-NeoX with a word-level tokenizer, saved as a local model directory."""
    directory = tmp_path_factory.mktemp("tiny-neox")
    make_tokenizer(directory)
    tiny_model().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in random_text(60)))
    return path


def run_cli(script: str, *overrides: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, returning its completed process (stdout and stderr captured)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


ENTRY_CONFIGS = {"evaluate.py": "evaluate"}  # entry points run_in_process can run: script -> its config name


def run_in_process(script: str, *overrides: str) -> subprocess.CompletedProcess:
    """``run_cli`` without starting a process: the script's own command-line check, then its Hydra main (with the
    one-line ``ConfigError`` handling) on the composed config, in this process, stdout and stderr captured.

    For the bad-input cases of a study, each of which would otherwise pay a Python + torch + Hydra start; every test
    that uses it also runs one case through ``run_cli`` so the real entry point stays covered."""
    import importlib.util
    import io

    from hydra import compose

    spec = importlib.util.spec_from_file_location(f"entry_{Path(script).stem}", ROOT / script)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    config_name, out, err = ENTRY_CONFIGS[script], io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            entry.check_command_line(entry.CONF, config_name, entry.MOVED, argv=list(overrides))
            with hydra_conf():
                cfg = compose(config_name, overrides=list(overrides))
            entry.main.__wrapped__(cfg)  # under hydra.main: exit_on_config_error(the study)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess([script, *overrides], code, out.getvalue(), err.getvalue())


def tiny_overrides(lm_dir: Path, text: Path, run_dir: Path, *extra: str) -> list[str]:
    """A real training config shrunk to seconds: tiny LM, tiny text, few tokens, CSV logging."""
    return [
        f"model.name_or_path={lm_dir}", "data=text_files", f"data.path={text}", "data.context_length=32",
        "stream.lm_batch_size=8", "stream.buffer_size=1024", "data.eval_tokens=512", "train.tokens=4096",
        "train.batch_size=128", "train.warmup_steps=2", "train.init_tokens=512", "trainer.checkpoint_every_n_steps=10",
        "hook.layer=1", "logger=csv", f"hydra.run.dir={run_dir}", *extra,
    ]


@contextlib.contextmanager
def hydra_conf():
    """The application's config search path, as inside ``train.py`` (needed where a set names another variant)."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield


@pytest.fixture
def hydra_app():
    """Run the test inside the application's config search path, as ``train.py``'s code runs."""
    with hydra_conf():
        yield


def compose_config(overrides: list[str], config_name: str = "config", hydra: bool = False):
    """The composed config of ``overrides`` (``hydra.*`` ones dropped unless ``hydra``), as the entry point sees it."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    kept = overrides if hydra else [o for o in overrides if not o.startswith("hydra.")]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=kept, return_hydra_config=hydra)
    with hydra_conf():
        return compose(config_name, overrides=kept, return_hydra_config=hydra)


def text_settings(path, context_length: int = 32, heldout_fraction: float = 0.1, streaming: bool = False):
    from sae.lm.session import TextSettings

    return TextSettings(source="files", path=str(path), text_column="text", split="train",
                        context_length=context_length, heldout_fraction=heldout_fraction, streaming=streaming)


def make_lm_datamodule(lm_dir, text, hooks, context_length: int = 32, lm_batch_size: int = 8, buffer_size: int = 256,
                  batch_size: int = 64, seed: int = 0, cache_dir=None, cache_dtype: str = "float16",
                  streaming: bool = False, plan=None):
    """A set-up ActivationDataModule over a session of ``lm_dir`` and ``text`` (no Trainer: on the CPU)."""
    from sae.data.datamodule import ActivationDataModule, StreamSettings
    from sae.lm.session import LMSession

    session = LMSession(str(lm_dir), text_settings(text, context_length, streaming=streaming), model_dtype="float32",
                        lm_batch_size=lm_batch_size, seed=seed)
    stream = StreamSettings(lm_batch_size=lm_batch_size, buffer_size=buffer_size,
                            cache_dir=None if cache_dir is None else str(cache_dir), cache_dtype=cache_dtype)
    dm = ActivationDataModule(session, hooks, stream, batch_size, seed, plan)
    dm.setup()
    return dm


# settings for building each variant by hand in a test (the one default of each is in conf/sae/<variant>.yaml)
TEST_HPARAMS = {
    "relu_tied": {"l1_coeff": 0.0},
    "relu": {"l1_coeff": 0.0},
    "topk": {"k": 4, "aux_coeff": 1 / 32, "k_aux": None},
}


def toy_data(**settings):
    """ToyData with conf/data/toy.yaml's settings, ``settings`` overriding them (a test's shape)."""
    from omegaconf import OmegaConf

    from sae.data.toy import ToyData

    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "toy.yaml"))
    keys = ("n_features", "d", "avg_active", "decay", "correlated", "seed")
    return ToyData(**{**{k: yaml[k] for k in keys}, **settings})


def feature_settings(**settings):
    """The features analysis' Settings from conf/analysis/features.yaml, ``settings`` overriding them."""
    from omegaconf import OmegaConf

    from sae.features.records import Settings

    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "analysis" / "features.yaml"))["settings"]
    return Settings(**{**yaml, "seed": 0, **settings})


def kill_after_checkpoint(overrides: list[str], run_dir: Path, step: int = 14) -> None:
    """Start ``train.py`` with ``overrides`` (writing to ``run_dir``) and SIGKILL it once a checkpoint of ``step``
    or later is on disk, as a pre-emption would."""
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(int(p.stem.split("step=")[1]) >= step for p in run_dir.glob("checkpoints/*step=*.ckpt")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def write_saelens_dir(directory: Path, weights: dict, cfg: dict) -> Path:
    """A directory as SAELens writes one (``sae_weights.safetensors`` + ``cfg.json``), for the import tests."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def tiny_meta(lm_dir: Path, text: Path, layer: int = 1) -> dict:
    """The ``sae.json`` record of a dictionary at ``layers.<layer>.resid`` of the tiny LM over ``text`` (for a study's
    test that saves a dictionary instead of training one)."""
    return {"model": {"name_or_path": str(lm_dir), "dtype": "float32"}, "hook": {"layer": layer, "site": "resid"},
            "data": {"source": "files", "path": str(text), "context_length": 32, "eval_tokens": 512,
                     "text_column": "text", "split": "train", "heldout_fraction": 0.1}, "stream": {"lm_batch_size": 8}}
